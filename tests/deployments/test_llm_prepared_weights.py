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


# ray.serve.llm's usage report at each replica's start (issue 25): sent only where Ray's
# usage statistics are on; the engine starts either way.


@pytest.mark.parametrize("usage_stats", ["0", "1", "false"])
def test_the_usage_report_is_sent_only_where_usage_statistics_are_on(
    usage_stats: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Off ("0"): the engine starts without the report; on, or a value Ray's rule
    refuses ("false"): the engine starts and the report is sent, as before."""
    from ray.llm._internal.serve.core.server import llm_server

    from deployments.llm.engine import LLMServer

    monkeypatch.setenv("RAY_USAGE_STATS_ENABLED", usage_stats)
    reports: list[object] = []
    monkeypatch.setattr(
        llm_server, "push_telemetry_report_for_all_models", lambda all_models: reports.append(1)
    )
    started: list[bool] = []

    async def start() -> None:
        started.append(True)

    server = LLMServer.__new__(LLMServer)  # its constructor starts a real engine
    server.engine = SimpleNamespace(start=start)  # type: ignore[assignment]
    server._llm_config = SimpleNamespace(model_id="m")  # type: ignore[assignment]
    asyncio.run(server._start_engine())
    assert started == [True]
    assert len(reports) == (0 if usage_stats == "0" else 1)


def test_the_base_engine_start_does_no_more_than_the_override_keeps_or_leaves_out() -> None:
    """`LLMServer._start_engine` restates ray.serve.llm's minus its usage report: a Ray
    whose engine start does anything else fails here, not silently in production."""
    from ray.serve.llm.deployment import LLMServer as RayLLMServer

    names = set(RayLLMServer._start_engine.__code__.co_names)
    assert names <= {
        "engine",
        "ValueError",
        "start",
        "push_telemetry_report_for_all_models",
        "_llm_config",
        "RAY_SERVE_LLM_ENABLE_DIRECT_STREAMING",
        "record_extra_usage_tag",
        "TagKey",
        "LLM_SERVE_DIRECT_STREAMING_ENABLED",
    }, names


def test_the_platforms_ray_runs_with_usage_statistics_off() -> None:
    from servegraph.deploy.local_ray import RAY_ENV

    assert RAY_ENV["RAY_USAGE_STATS_ENABLED"] == "0"
