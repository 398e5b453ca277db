"""`ray.serve.llm`'s node initialisation (a download task per node, a fresh worker that
imports torch and vLLM) is skipped only for a model folder already on the engine's one
node (`deployments.llm.engine.PreparedWeights`); a hub id, a folder elsewhere, or an
engine spread over other nodes is initialised as before. Ray's node and placement group
look-ups stand in for a cluster."""

from __future__ import annotations

import asyncio
from pathlib import Path
from types import SimpleNamespace

import pytest
import ray

from deployments.llm.engine import PreparedWeights


def _skips(source: str, monkeypatch: pytest.MonkeyPatch, nodes: list[str] | None) -> bool:
    """Whether the callback skips the node initialisation; `nodes`: each bundle's node,
    None for no placement group."""
    monkeypatch.setattr(
        ray, "get_runtime_context", lambda: SimpleNamespace(get_node_id=lambda: "here")
    )
    monkeypatch.setattr(
        ray.util,
        "placement_group_table",
        lambda pg: {"bundles_to_node_id": dict(enumerate(nodes))},
    )
    config = SimpleNamespace(model_loading_config=SimpleNamespace(model_source=source))
    group = None if nodes is None else object()
    callback = PreparedWeights(llm_config=config, ctx_kwargs={"placement_group": group})  # type: ignore[arg-type]
    asyncio.run(callback.on_before_node_init())
    return not callback.ctx.run_init_node


def test_a_prepared_folder_on_the_engines_node_skips_the_download_task(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    (tmp_path / "config.json").write_text("{}")
    assert _skips(str(tmp_path), monkeypatch, ["here"])
    assert _skips(str(tmp_path), monkeypatch, ["here", "here"])
    # what the skipped download step would have done besides: Ray's torch workaround
    assert (tmp_path / "torch" / "kernels").is_dir()


@pytest.mark.parametrize(
    "where",
    [
        "hub id",
        "folder without a model",
        "missing folder",
        "engine on two nodes",
        "other node",
        "no placement group",
    ],
)
def test_anything_else_is_initialised_as_before(
    where: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    (tmp_path / "empty").mkdir()
    source, nodes = {
        "hub id": ("HuggingFaceTB/SmolLM2-135M-Instruct", ["here"]),
        "folder without a model": (str(tmp_path / "empty"), ["here"]),
        "missing folder": (str(tmp_path / "gone"), ["here"]),
        "engine on two nodes": (str(tmp_path / "model"), ["here", "there"]),
        "other node": (str(tmp_path / "model"), ["there"]),
        "no placement group": (str(tmp_path / "model"), None),
    }[where]
    assert not _skips(source, monkeypatch, nodes)
