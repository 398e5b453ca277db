"""Simulated models: a model server's forward pass replaced by a wait taken from a
curve measured on real hardware, for benchmarks that need more replicas than this
machine can run (`benchmarks.spike`: twenty replicas of real models do not fit on 2
cores, and there more replicas add no capacity, so a scaling policy cannot be judged
with real compute).

Only the forward pass (and a replica's model load) is simulated: the deployment, its
batching, gateway, handles, retries, shedding and autoscaling are the real ones. Off
unless `SERVEGRAPH_SIMULATED_MODELS` names a curves file (`Curves`, JSON); never what
`make run` serves. No Ray here.
"""

from __future__ import annotations

import bisect
import functools
import hashlib
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

ENV = "SERVEGRAPH_SIMULATED_MODELS"


class BatchCurve(BaseModel):
    """A batched model (an encoder): seconds per forward pass by batch size, measured
    at some sizes; linear between them, and past the largest at its cost per item."""

    model_config = ConfigDict(extra="forbid")

    batch_s: dict[int, float] = Field(min_length=1, description="batch size -> seconds")
    load_s: float = Field(0.0, ge=0, description="A replica's model load, in seconds.")
    dim: int = Field(384, ge=1, description="The vectors' size (an encoder's).")

    @model_validator(mode="after")
    def _positive(self) -> BatchCurve:
        if any(n < 1 or s <= 0 for n, s in self.batch_s.items()):
            raise ValueError("batch_s: batch sizes >= 1 and seconds > 0")
        return self

    def seconds(self, n: int) -> float:
        if n <= 0:
            return 0.0
        sizes = sorted(self.batch_s)
        if n <= sizes[0]:
            return self.batch_s[sizes[0]] * n / sizes[0] if n < sizes[0] else self.batch_s[n]
        if n >= sizes[-1]:
            return self.batch_s[sizes[-1]] * n / sizes[-1]
        hi = bisect.bisect_left(sizes, n)
        a, b = sizes[hi - 1], sizes[hi]
        share = (n - a) / (b - a)
        return self.batch_s[a] + share * (self.batch_s[b] - self.batch_s[a])


class DecodeCurve(BaseModel):
    """An LLM engine with continuous batching: seconds per decode step by sequences
    running, measured at some counts (linear between, flat past the largest), the
    prefill's seconds per prompt token, and a reply's length when nothing ends it
    sooner."""

    model_config = ConfigDict(extra="forbid")

    step_s: dict[int, float] = Field(min_length=1, description="running sequences -> s/step")
    prefill_s_per_token: float = Field(0.0, ge=0)
    reply_tokens: int = Field(64, ge=1)
    load_s: float = Field(0.0, ge=0, description="A replica's engine start, in seconds.")

    def step(self, running: int) -> float:
        counts = sorted(self.step_s)
        running = max(running, counts[0])
        if running >= counts[-1]:
            return self.step_s[counts[-1]]
        hi = bisect.bisect_left(counts, running)
        if counts[hi] == running:
            return self.step_s[running]
        a, b = counts[hi - 1], counts[hi]
        return self.step_s[a] + (running - a) / (b - a) * (self.step_s[b] - self.step_s[a])


class Curves(BaseModel):
    """What a benchmark's simulated models wait: where and how it was measured, and a
    curve per model kind."""

    model_config = ConfigDict(extra="forbid")

    measured_on: str = Field(description="The hardware and the run the curves come from.")
    encoder: BatchCurve | None = None
    llm: DecodeCurve | None = None


@functools.cache
def _load(path: str) -> Curves:
    return Curves.model_validate_json(Path(path).read_text())


def curves() -> Curves | None:
    """The curves this process simulates with, or None: real models."""
    path = os.environ.get(ENV)
    return _load(path) if path else None


def vector(text: str, dim: int) -> np.ndarray:
    """A simulated encoder's output: an L2-normalised float32 vector, the same for the
    same text (so an index built from them finds what was put in)."""
    seed = int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")
    row = np.random.default_rng(seed).standard_normal(dim).astype(np.float32)
    return row / np.linalg.norm(row)


def instance(schema: dict[str, Any], rng: random.Random, defs: dict[str, Any] | None = None) -> Any:
    """A value valid for the JSON schema `schema` (the subset pydantic writes: refs,
    const, enum, anyOf/oneOf/allOf, objects, arrays, scalars), choices drawn from `rng`:
    a simulated LLM's guided-JSON reply. `defs`: the schema's `$defs` (default: its own)."""
    defs = schema.get("$defs", {}) if defs is None else defs
    if "$ref" in schema:
        return instance(defs[schema["$ref"].rsplit("/", 1)[-1]], rng, defs)
    if "const" in schema:
        return schema["const"]
    if "enum" in schema:
        return rng.choice(schema["enum"])
    for key in ("anyOf", "oneOf"):
        if key in schema:
            options = [o for o in schema[key] if o.get("type") != "null"] or schema[key]
            return instance(rng.choice(options), rng, defs)
    if "allOf" in schema:
        return instance(schema["allOf"][0], rng, defs)
    kind = schema.get("type", "object")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "null")
    if kind == "object":
        properties = schema.get("properties", {})
        return {name: instance(sub, rng, defs) for name, sub in properties.items()}
    if kind == "array":
        return [
            instance(schema.get("items", {}), rng, defs) for _ in range(schema.get("minItems", 1))
        ]
    if kind == "string":
        return "simulated"[: schema.get("maxLength", 9)].ljust(schema.get("minLength", 0), "x")
    if kind in ("integer", "number"):
        return schema.get("minimum", 0)
    if kind == "boolean":
        return rng.random() < 0.5
    return None
