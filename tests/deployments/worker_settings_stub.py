"""Preloaded by `test_llm_worker_server`'s forkserver before `worker_server`'s own
modules: the worker's settings and modules without vLLM (importing it takes 10 s)."""

from deployments.llm import worker_server

STUB = {"OMP_WAIT_POLICY": "PASSIVE"}  # a setting the server starts over with

worker_server.predicted_settings = lambda: dict(STUB)  # type: ignore[assignment]
worker_server.WORKER_MODULES = ("json",)
