"""The LLM's engine deployment: `ray.serve.llm`'s `LLMServer`, plus the check that the
replica loaded the model files its application was built with
(`servegraph.server.SameModel`). Same class name, so the deployment keeps its name
(`LLMServer:<model>`), which dashboards and alerts use."""

from __future__ import annotations

from typing import Any

from ray.serve.llm.deployment import LLMServer as RayLLMServer

from servegraph.server import SameModel


class LLMServer(RayLLMServer):
    async def __init__(self, llm_config: Any, **kwargs: Any) -> None:  # type: ignore[misc]  # Serve awaits an async constructor, as ray.serve.llm's own
        await super().__init__(llm_config, **kwargs)
        self._same_model = SameModel(llm_config.model_loading_config.model_source)

    async def check_health(self) -> None:
        await super().check_health()
        self._same_model.check()
