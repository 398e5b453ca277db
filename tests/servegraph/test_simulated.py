"""A benchmark's simulated models (`servegraph.deploy.simulated`): the curves' arithmetic, an
encoder that waits instead of loading and running a model, and an LLM engine whose
replies the pipelines' client reads as it reads vLLM's."""

from __future__ import annotations

import asyncio
import json
import random
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from servegraph.deploy import simulated
from servegraph.deploy.simulated import BatchCurve, Curves, DecodeCurve

CURVES = Curves(
    measured_on="a test",
    encoder=BatchCurve(batch_s={1: 0.01, 8: 0.02, 64: 0.1}, load_s=0.0, dim=16),
    llm=DecodeCurve(step_s={1: 0.001, 32: 0.002}, prefill_s_per_token=0.0, reply_tokens=12),
)


@pytest.fixture
def curves_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "curves.json"
    path.write_text(CURVES.model_dump_json())
    monkeypatch.setenv(simulated.ENV, str(path))
    return path


def test_curves_interpolate_between_measured_points() -> None:
    encoder = CURVES.encoder
    assert encoder is not None
    assert encoder.seconds(8) == 0.02
    assert encoder.seconds(36) == pytest.approx(0.06)  # halfway from 8 to 64
    assert encoder.seconds(128) == pytest.approx(0.2)  # past 64: its cost per item
    llm = CURVES.llm
    assert llm is not None
    assert llm.step(0) == 0.001 and llm.step(64) == 0.002
    assert llm.step(16) == pytest.approx(0.001 + 15 / 31 * 0.001)


def test_off_unless_a_benchmark_names_a_curves_file(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(simulated.ENV, raising=False)
    assert simulated.curves() is None


def test_a_simulated_encoder_loads_nothing_and_gives_stable_unit_vectors(curves_file: Path) -> None:
    from deployments.embedder.model import SentenceEncoder

    encoder = SentenceEncoder("/no/such/model")  # a real one would fail to load
    vectors = encoder.encode(["a", "b", "a"], batch_size=2)
    assert vectors.shape == (3, 16) and vectors.dtype == np.float32
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1)
    assert np.array_equal(vectors[0], vectors[2]) and not np.array_equal(vectors[0], vectors[1])


def test_a_guided_reply_is_an_instance_of_its_schema() -> None:
    from typing import Literal

    from pydantic import BaseModel, Field

    from servegraph.deploy.simulated import instance

    class Step(BaseModel):
        tool: Literal["search_kb", "lookup_order"]
        argument: str = Field(max_length=80)
        done: bool | None = None

    class Reply(BaseModel):
        steps: list[Step] = Field(min_length=1)
        reply: str = Field(min_length=3, max_length=5)

    schema = Reply.model_json_schema()
    tools = set()
    for seed in range(20):
        value = instance(schema, random.Random(seed))
        tools.add(Reply.model_validate(value).steps[0].tool)  # raises if not valid
    assert tools == {"search_kb", "lookup_order"}  # the choices are drawn


def test_the_simulated_engine_streams_what_the_client_reads(curves_file: Path) -> None:
    from ray.serve.llm.openai_api_models import ChatCompletionRequest

    from deployments.llm.simulated import SimulatedEngine

    engine = SimulatedEngine(SimpleNamespace(model_id="m"))
    request = ChatCompletionRequest(
        model="m",
        messages=[{"role": "user", "content": "hello " * 40}],
        max_completion_tokens=5,
        stream=True,
        stream_options={"include_usage": True, "continuous_usage_stats": True},
    )

    async def lines() -> list[str]:
        return [line async for line in engine.chat(request)]

    got = asyncio.run(lines())
    assert got[-1] == "data: [DONE]\n\n"
    chunks = [json.loads(line.removeprefix("data:")) for line in got[:-1]]
    assert len([c for c in chunks if c["choices"]]) == 5  # one per token, max_tokens 5
    assert chunks[-1]["usage"]["completion_tokens"] == 5
    assert chunks[-1]["usage"]["prompt_tokens"] > 40
    assert engine.running == 0
