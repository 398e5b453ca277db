"""The LLM's engine deployment: `ray.serve.llm`'s `LLMServer`, plus

- the check that the replica loaded the model files its application was built with
  (`servegraph.server.SameModel`);
- the request's cost: the replica's time shared among the requests in flight, which
  under continuous batching is a split by tokens processed (`servegraph.cost.metering.Meter`),
  over every request the engine serves (the OpenAI routes' too). A pipeline's call
  (`LLMClient`, which sends no raw HTTP request) gets its charge as one more item after
  the engine's last one;
- a call's allowance (what its request's budget had left, `servegraph.cost.budget.allowance`):
  the generation stops when the call's charge reaches it, and the charge item says so;
- the engine's CPU priority, below the other replicas' (`LLMSettings.cpu_nice_offset`,
  `lower_engine_priority`);
- the CPU partition of its node: the platform's processes off its model worker's cores
  (`LLMSettings.cpu_partition`, `deployments.llm.partition`);
- its engine's sockets in a folder of its own, which goes with it
  (`deployments.llm.sockets`).

Same class name, so the deployment keeps its name (`LLMServer:<model>`), which
dashboards and alerts use.
"""

from __future__ import annotations

import os
from pathlib import Path

from deployments.llm import forkserver, partition, sockets

# The replica on every core of its node before its engine's processes start from it
# (`deployments.llm.partition`): a replica started after a sweep inherits other cores.
# (Its variable read as is: the settings' imports would delay the forkserver below.)
# And its engine's sockets in a folder of its own (`deployments.llm.sockets`), which
# the processes started below inherit.
SOCKETS: Path | None = None
if forkserver.in_an_actor():
    partition.prepare(os.environ.get(partition.ENV, "off"))
    SOCKETS = sockets.private_folder()

# First, in a replica that asked for it: vLLM's engine core imports in the forkserver
# while this process imports what follows (`deployments.llm.forkserver`).
forkserver.start_early()

import contextlib  # noqa: E402
import math  # noqa: E402
import time  # noqa: E402
from collections.abc import AsyncIterator  # noqa: E402
from typing import Any  # noqa: E402

from ray.llm._internal.common.callbacks.base import CallbackBase  # noqa: E402
from ray.serve.llm.deployment import LLMServer as RayLLMServer  # noqa: E402

from deployments.llm.client import STOPPED  # noqa: E402
from deployments.llm.settings import LLMSettings  # noqa: E402
from servegraph.server import (  # noqa: E402
    CHARGE_ITEM,
    Meter,
    SameModel,
    prices,
    replica_resources,
)

# How long an arriving request counts as the engine's before vLLM has it (`_engine_busy`)
ARRIVING_S = 1.0


def lower_engine_priority(offset: int, only: str | None = None) -> list[int]:
    """Run every process this one started (vLLM's engine and its workers), or those
    whose command line has `only`, each of their threads, `offset` lower in CPU priority
    than this process (Unix nice, capped at 19); this process's own threads keep theirs.
    The processes' pids.

    By hand because neither Ray nor vLLM offers it per deployment: Ray starts every
    worker at one niceness (`worker_niceness`, 15) and leaves the rest to the OS. On
    Linux a priority is a thread's, so each thread of each process is set, and the
    threads and processes they start later inherit it. Called once the engine runs,
    not before: the replica's own thread that builds the engine is its event loop too
    (`RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD=0`), which answers every request."""
    import psutil

    # This process's priority is its main thread's (tid = pid): the one `ps` shows, and
    # Ray's `worker_niceness`; threads its core started earlier may differ.
    wanted = min(os.getpriority(os.PRIO_PROCESS, os.getpid()) + max(offset, 0), 19)
    lowered = []
    for child in psutil.Process().children(recursive=True):
        try:
            if only is not None and only not in " ".join(child.cmdline()):
                continue
            for thread in child.threads():
                with contextlib.suppress(ProcessLookupError):  # a thread that ended
                    os.setpriority(os.PRIO_PROCESS, thread.id, wanted)
            lowered.append(child.pid)
        except psutil.NoSuchProcess:
            continue
    return lowered


def _usage_stats_enabled() -> bool:
    """Whether Ray's usage statistics are on in this process (Ray's own rule: its
    environment variable, then its config file). Where that rule fails (a value it
    refuses, such as `RAY_USAGE_STATS_ENABLED=false`, or the module moved), on: the
    report is sent as before, and the replica starts as it did."""
    try:
        from ray._common.usage.usage_lib import usage_stats_enabled

        return bool(usage_stats_enabled())
    except Exception:
        return True


class PreparedWeights(CallbackBase):
    """`ray.serve.llm`'s start-up hook (the public `LLMConfig.callback_config`; the base
    class lives in `ray.llm._internal`): skips the node initialisation when the model is
    a folder already on this node.

    That initialisation runs one Ray task per node of the engine's placement group to
    download the model's files. Each task is a fresh worker process that imports torch
    and vLLM: 11.6-12.2 s of a 59-65 s LLM replica start on this machine (issue 25,
    `benchmarks.cold_start`). For a prepared folder (`deployments.llm.prepare`, or a
    configured path) it downloads nothing and returns the path it was given; its one
    other effect, the torch cache's `kernels` folder (Ray's workaround for a torch bug),
    is made here. A model named by a hub id or a bucket, or an engine spread over other
    nodes, is initialised as before. The engine finds a missing folder on its own,
    naming it."""

    async def on_before_node_init(self) -> None:
        import ray

        # A `ModelLoadingConfig` once LLMConfig has validated it (typed as either)
        source = getattr(self.llm_config.model_loading_config, "model_source", None)
        if not (isinstance(source, str) and os.path.isfile(os.path.join(source, "config.json"))):
            return
        if self.ctx.placement_group is None:  # Ray's own path always has one
            return
        here = ray.get_runtime_context().get_node_id()
        nodes = ray.util.placement_group_table(self.ctx.placement_group)["bundles_to_node_id"]
        if set(nodes.values()) != {here}:
            return
        import torch.hub

        # As ray.serve.llm's download step does, with the same torch function
        kernels = os.path.join(torch.hub._get_torch_home(), "kernels")
        os.makedirs(kernels, exist_ok=True)
        self.ctx.run_init_node = False


class LLMServer(RayLLMServer):
    _last_request = -math.inf

    async def __init__(self, llm_config: Any, **kwargs: Any) -> None:  # type: ignore[misc]  # Serve awaits an async constructor, as ray.serve.llm's own
        forkserver.use_for_engine_core()  # where start_early started the server
        await super().__init__(llm_config, **kwargs)
        settings = LLMSettings()
        self._partition: partition.Partition | None = None
        if settings.cpu_partition != "off":
            kept = partition.Partition(settings.cpu_partition, self._engine_busy)
            self._partition = kept if kept.start() else None
        # the engine runs now; where the node is partitioned, its core keeps this replica's
        # priority (`partition`'s docstring: lowered, it starved among the replicas)
        lower_engine_priority(
            settings.cpu_nice_offset,
            only=partition.WORKER_TITLE if self._partition is not None else None,
        )
        self._same_model = SameModel(llm_config.model_loading_config.model_source)
        self._meter = Meter(replica_resources())

    async def _start_engine(self) -> None:
        """`ray.serve.llm`'s engine start, without its usage report where Ray's usage
        statistics are off (as the platform runs Ray: `servegraph.deploy.local_ray`'s
        `RAY_PRIVATE_ENV`, cluster.yaml).

        Its report goes to an actor of its own on the head node, created by the first
        replica (a worker process importing `ray.serve.llm`), which then asks Serve's
        controller for its status; the replica's constructor waits for all of it. Left
        out: 5.6 s of the first LLM replica's start on a fresh cluster on this machine
        (about 1 s of a later one's; issue 25, `benchmarks.cold_start`), for a report
        that goes nowhere with usage statistics off. Also left out: the base's
        direct-streaming usage tag, another usage-statistics entry. The library's own
        switch would be better; it has none (`ray.llm`'s `_start_engine` pushes it
        unconditionally). Where the base no longer has this method, nothing calls this
        one and the base's own start runs; a test holds the base's body to what this
        leaves out."""
        if _usage_stats_enabled():
            await super()._start_engine()
            return
        if self.engine is None:  # as the base says it
            raise ValueError("Engine is not set")
        await self.engine.start()

    async def check_health(self) -> None:
        await super().check_health()
        self._same_model.check()

    async def __del__(self) -> None:
        partition_ = getattr(self, "_partition", None)
        if partition_ is not None:  # every process back on every core before it goes
            partition_.stop()
        try:
            await super().__del__()
        finally:
            sockets.remove(SOCKETS)

    def _engine_busy(self) -> bool:
        """Whether vLLM's engine has requests: ray.serve.llm's engine holds vLLM's
        client privately (`_engine_client`); where it no longer does, a request seen in
        the last `partition.IDLE_S` (`_last_request`) stands for it. A request that
        arrived in the last `ARRIVING_S` counts too: the partition looks as it arrives,
        before vLLM has it."""
        since = time.monotonic() - self._last_request
        client = getattr(self.engine, "_engine_client", None)
        count = getattr(client, "get_num_unfinished_requests", None)
        if count is not None:
            return since < ARRIVING_S or bool(count())
        return since < partition.IDLE_S

    def _arrived(self) -> None:
        self._last_request = time.monotonic()
        if self._partition is not None:
            self._partition.wake()

    # Like ray.serve.llm's own, these return the stream (an async generator) from a
    # coroutine; Serve streams it to the caller.
    async def chat(
        self, request: Any, raw_request_info: Any = None, allowance_usd: float | None = None
    ) -> Any:
        self._arrived()
        stream = await super().chat(request, raw_request_info)
        return self._metered(stream, raw_request_info, allowance_usd)

    async def completions(self, request: Any, raw_request_info: Any = None) -> Any:
        self._arrived()
        stream = await super().completions(request, raw_request_info)
        return self._metered(stream, raw_request_info)

    async def _metered(
        self, stream: AsyncIterator[Any], raw_request_info: Any, allowance_usd: float | None = None
    ) -> AsyncIterator[Any]:
        if allowance_usd is not None and not allowance_usd >= 0:
            allowance_usd = 0.0  # less than nothing, or not a number: nothing is allowed
        ticket = self._meter.start()
        stopped = False
        try:
            async for item in stream:
                yield item
                if allowance_usd is not None:  # an infinite one is never reached
                    stopped = prices().usd(self._meter.held(ticket)) >= allowance_usd
                    if stopped:
                        break
        finally:
            if stopped:  # closing vLLM's stream aborts the request in the engine
                await stream.aclose()  # type: ignore[attr-defined]  # an async generator
            charge = self._meter.stop(ticket)
        if raw_request_info is None:  # a pipeline's call: it takes the charge
            yield {CHARGE_ITEM: charge, **({STOPPED: "budget"} if stopped else {})}
