"""The curves the simulated models wait (`servegraph.deploy.simulated`), measured here on the
real models: the sentence encoder's seconds per forward pass by batch size and its
load; vLLM's seconds per decode step by sequences running, its prefill per prompt
token, and its engine's start. Each point is the median of several runs.

    .venv/bin/python -m benchmarks.calibrate [--out benchmarks/curves/cpu.json]
        [--llm-start-from real.json ... --simulated-start-from sim.json ...] [--start-only]

The LLM engine's start is what a simulated replica waits, so that its start is the real
replica's. vLLM's offline `LLM()` measures it as vLLM starts it (the engine core and its
worker spawned, each importing torch and vLLM again), which the platform's replica no
longer does: it forks both from a preloaded server (`deployments.llm.forkserver`). So
where `benchmarks.cold_start` results are given, the wait is the real replica's start
less the simulated replica's own (its imports are real: `ray.serve.llm` imports vLLM),
both deployed at rest, medians (`engine_start_s`):

    .venv/bin/python -m benchmarks.cold_start --servers llm --json real-1.json  # a few of each
    SERVEGRAPH_SIMULATED_MODELS=benchmarks/curves/cpu.json \
        .venv/bin/python -m benchmarks.cold_start --servers llm --json sim-1.json
    .venv/bin/python -m benchmarks.calibrate --start-only \
        --llm-start-from real-*.json --simulated-start-from sim-*.json

At rest: on a cluster a new replica starts on a node of its own. `--start-only`
changes only that wait in `--out`, keeping its measured curves.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform as stdlib_platform
import statistics
import time
from pathlib import Path
from typing import Any

from servegraph.deploy.simulated import BatchCurve, Curves, DecodeCurve

ROOT = Path(__file__).resolve().parent
BATCHES = (1, 4, 16, 64)
RUNNING = (1, 8, 32, 64)
DECODE_TOKENS = 32
REPLY_TOKENS = 64  # a reply's length when nothing stops it sooner: the pipelines' calls
# ask for 60 (triage's choice) to 256 (rag's answer) and most end by stop sooner


def encoder_curve(repeats: int = 5) -> BatchCurve:
    from benchmarks.model_servers import TEXTS
    from deployments.embedder.model import SentenceEncoder

    started = time.perf_counter()
    encoder = SentenceEncoder()
    load_s = time.perf_counter() - started
    encoder.encode(TEXTS[:64])  # warm
    batch_s = {}
    for n in BATCHES:
        runs = []
        for _ in range(repeats):
            began = time.perf_counter()
            encoder.encode(TEXTS[:n], batch_size=n)
            runs.append(time.perf_counter() - began)
        batch_s[n] = round(statistics.median(runs), 5)
        print(f"[calibrate] encoder batch {n}: {batch_s[n] * 1000:.1f} ms", flush=True)
    return BatchCurve(batch_s=batch_s, load_s=round(load_s, 2), dim=encoder.dim)


SIMULATED_LOAD = "simulated_load_s"  # in a cold_start result of simulated models


def engine_start_s(real: list[dict[str, Any]], simulated: list[dict[str, Any]]) -> float:
    """The wait that makes a simulated LLM replica's start the real one's: the median
    real start (`benchmarks.cold_start --json`, the LLM deployed at rest) less the
    median simulated start without its wait (the same, under `SERVEGRAPH_SIMULATED_MODELS`:
    its start less the curve's wait it made, which cold_start records). What the
    simulated replica does not do, the engine's processes, weights, warm-up, engine
    client and OpenAI state, and their load on the replica's imports, is the wait."""

    def totals(results: list[dict[str, Any]], simulated: bool) -> list[float]:
        out = []
        for result in results:
            llm = result.get("llm")
            if llm is None:
                raise ValueError("not a benchmarks.cold_start result with the llm server in it")
            if (SIMULATED_LOAD in llm) != simulated:
                kind = "simulated models'" if simulated else "the real engine's"
                raise ValueError(
                    f"--{'simulated' if simulated else 'llm'}-start-from: "
                    f"not a cold_start result of {kind}"
                )
            out.append(llm["total_s"] - llm.get(SIMULATED_LOAD, 0.0))
        if not out:
            raise ValueError("no cold_start results")
        return out

    wait = statistics.median(totals(real, False)) - statistics.median(totals(simulated, True))
    if wait < 0:
        raise ValueError(f"the simulated replica starts slower than the real one ({wait:.1f} s)")
    return wait


def llm_curve(repeats: int = 3, start_s: float | None = None) -> DecodeCurve:
    from vllm import LLM, SamplingParams

    from benchmarks.model_servers import PROMPTS
    from deployments.llm.server import engine_kwargs
    from deployments.llm.settings import LLMSettings

    settings = LLMSettings()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(settings.kv_cache_gib))
    started = time.perf_counter()
    # No prefix cache: the repeats reuse their prompts, and a cached prefill is not one
    llm = LLM(model=settings.path, enable_prefix_caching=False, **engine_kwargs(settings))
    load_s = time.perf_counter() - started
    prompts = [PROMPTS[i % len(PROMPTS)] + f" ({i})" for i in range(max(RUNNING))]
    decode = SamplingParams(max_tokens=DECODE_TOKENS, temperature=0.0, ignore_eos=True)
    first = SamplingParams(max_tokens=1, temperature=0.0)
    llm.generate(prompts[:2], decode, use_tqdm=False)  # warm
    step_s = {}
    for running in RUNNING:
        runs = []
        for _ in range(repeats):
            began = time.perf_counter()
            llm.generate(prompts[:running], decode, use_tqdm=False)
            prefill = time.perf_counter()
            llm.generate(prompts[:running], first, use_tqdm=False)
            ended = time.perf_counter()
            # the whole generation less its prefill (a one-token run), per decode step
            runs.append(((prefill - began) - (ended - prefill)) / (DECODE_TOKENS - 1))
        step_s[running] = round(max(statistics.median(runs), 1e-4), 5)
        print(f"[calibrate] llm step at {running} running: {step_s[running] * 1000:.1f} ms")
    long_prompt = "Summarise this support history. " + "The customer wrote again. " * 120
    tokens = len(llm.get_tokenizer().encode(long_prompt))
    runs = []
    for _ in range(repeats):
        began = time.perf_counter()
        llm.generate([long_prompt], first, use_tqdm=False)
        runs.append(time.perf_counter() - began)
    prefill_s = statistics.median(runs) / tokens
    llm.llm_engine.engine_core.shutdown()  # its processes would poll on, taking CPU
    del llm
    gc.collect()
    return DecodeCurve(
        step_s=step_s,
        prefill_s_per_token=round(prefill_s, 6),
        reply_tokens=REPLY_TOKENS,
        load_s=round(load_s if start_s is None else start_s, 2),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "curves" / "cpu.json")
    parser.add_argument(
        "--llm-start-from",
        type=Path,
        nargs="+",
        help="benchmarks.cold_start --servers llm --json files of the real LLM",
    )
    parser.add_argument(
        "--simulated-start-from",
        type=Path,
        nargs="+",
        help="the same, run with SERVEGRAPH_SIMULATED_MODELS set",
    )
    parser.add_argument(
        "--start-only",
        action="store_true",
        help="change only the LLM engine's start in --out, keeping its measured curves",
    )
    args = parser.parse_args()
    if bool(args.llm_start_from) != bool(args.simulated_start_from):
        parser.error("--llm-start-from and --simulated-start-from go together")
    start_s = None
    if args.llm_start_from:
        start_s = engine_start_s(
            [json.loads(p.read_text()) for p in args.llm_start_from],
            [json.loads(p.read_text()) for p in args.simulated_start_from],
        )
        print(f"[calibrate] the LLM engine's start: {start_s:.2f} s", flush=True)
    source = (
        f"; the LLM engine's start from {len(args.llm_start_from)} real and "
        f"{len(args.simulated_start_from)} simulated benchmarks.cold_start runs"
        if args.llm_start_from
        else ""
    )
    if args.start_only:
        if start_s is None:
            parser.error("--start-only needs --llm-start-from and --simulated-start-from")
        curves = Curves.model_validate_json(args.out.read_text())
        if curves.llm is None:
            parser.error(f"{args.out} has no llm curve")
        curves.llm.load_s = round(start_s, 2)
        curves.measured_on = curves.measured_on.split("; the LLM engine's start")[0] + (
            f"{source} on {time.strftime('%Y-%m-%d')}"
        )
        args.out.write_text(curves.model_dump_json(indent=1) + "\n")
        print(f"[calibrate] wrote {args.out}")
        return
    from deployments.llm.settings import LLMSettings
    from servegraph.deploy.simulated import ENV

    if os.environ.get(ENV):
        parser.error(f"{ENV} is set: this would measure the simulation; unset it")

    where = f"{stdlib_platform.machine()} {os.cpu_count()} CPUs, vLLM on the CPU"
    curves = Curves(
        measured_on=f"{where}; all-MiniLM-L6-v2 and vLLM-CPU {LLMSettings().model_id}; "
        f"benchmarks.calibrate on {time.strftime('%Y-%m-%d')}{source}",
        encoder=encoder_curve(),
        llm=llm_curve(start_s=start_s),
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(curves.model_dump_json(indent=1) + "\n")
    print(f"[calibrate] wrote {args.out}")


if __name__ == "__main__":
    main()
