"""The curves the simulated models wait (`servegraph.deploy.simulated`), measured here on the
real models: the sentence encoder's seconds per forward pass by batch size and its
load; vLLM's seconds per decode step by sequences running, its prefill per prompt
token, and its engine's start. Each point is the median of several runs.

    .venv/bin/python -m benchmarks.calibrate [--out benchmarks/curves/cpu.json]
        [--llm-start-from cold-start.json ...] [--start-only]

The LLM engine's start is what a replica waits for after its imports. vLLM's offline
`LLM()` measures it as vLLM starts it (the engine core and its worker spawned, each
importing torch and vLLM again), which the platform's replica no longer does: it forks
both from a preloaded server (`deployments.llm.forkserver`). So the curve's start comes
from `benchmarks.cold_start`'s breakdown of the platform's own replica where its JSON
is given (`--llm-start-from`, one file per start): the stages from the end of the
replica's imports to the engine's warm-up, median over the files. The simulated
replica does its imports itself (they are `ray.serve.llm`'s), so they are left out.
`--start-only` changes only that start in `--out`, keeping its measured curves.
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


# `benchmarks.cold_start`'s stages that make the engine's start: after the replica's
# imports, up to its engine's warm-up (the engine client's and OpenAI state's set-up,
# where its log line is found; else it is in the replica's rest, which the simulated
# replica pays itself)
ENGINE_START_STAGES = (
    "engine configuration",
    "engine core process starts",
    "model worker process starts",
    "weights, KV cache, warm-up",
    "engine client and OpenAI state",
)


def engine_start_s(cold_starts: list[dict[str, Any]]) -> float:
    """The median engine start of `benchmarks.cold_start` results (its `--json`), each
    the LLM's deployed start: the stages of `ENGINE_START_STAGES`."""
    starts = []
    for result in cold_starts:
        if "llm" not in result:
            raise ValueError("not a benchmarks.cold_start result with the llm server in it")
        stages = result["llm"]["stages_s"]
        starts.append(
            sum(s for label, s in stages.items() if label.startswith(ENGINE_START_STAGES))
        )
    return statistics.median(starts)


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
        help="benchmarks.cold_start --servers llm --json files: the engine's start from them",
    )
    parser.add_argument(
        "--start-only",
        action="store_true",
        help="change only the LLM engine's start in --out (needs --llm-start-from)",
    )
    args = parser.parse_args()
    if args.start_only:
        if not args.llm_start_from:
            parser.error("--start-only needs --llm-start-from")
        curves = Curves.model_validate_json(args.out.read_text())
        if curves.llm is None:
            parser.error(f"{args.out} has no llm curve")
        start_s = engine_start_s([json.loads(p.read_text()) for p in args.llm_start_from])
        curves.llm.load_s = round(start_s, 2)
        curves.measured_on += (
            f"; the LLM engine's start from benchmarks.cold_start on {time.strftime('%Y-%m-%d')}"
        )
        args.out.write_text(curves.model_dump_json(indent=1) + "\n")
        print(f"[calibrate] {args.out}: the LLM engine's start is {start_s:.2f} s")
        return
    from deployments.llm.settings import LLMSettings
    from servegraph.deploy.simulated import ENV

    if os.environ.get(ENV):
        parser.error(f"{ENV} is set: this would measure the simulation; unset it")

    where = f"{stdlib_platform.machine()} {os.cpu_count()} CPUs, vLLM on the CPU"
    curves = Curves(
        measured_on=f"{where}; all-MiniLM-L6-v2 and vLLM-CPU {LLMSettings().model_id}; "
        f"benchmarks.calibrate on {time.strftime('%Y-%m-%d')}",
        encoder=encoder_curve(),
        llm=llm_curve(
            start_s=engine_start_s([json.loads(p.read_text()) for p in args.llm_start_from])
            if args.llm_start_from
            else None
        ),
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(curves.model_dump_json(indent=1) + "\n")
    print(f"[calibrate] wrote {args.out}")


if __name__ == "__main__":
    main()
