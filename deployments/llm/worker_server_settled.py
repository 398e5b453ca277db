"""Last in the engine core's server's preload, where it started over with its model
worker's settings (`deployments.llm.worker_server`): the server back on its replica's
CPUs, so that the engine core forked from it runs there.

`worker_server.prepare` put it back there first thing, but a module imported since may
have bound it to the worker's cores again: an OpenMP runtime bundled with a wheel
(scikit-learn's, sentencepiece's) reads the worker's binding as it loads, and binds the
thread that loads it (seen: importing vLLM's engine core put the server on core 0)."""

from deployments.llm import worker_server

worker_server.settle()
