"""Last in the engine core's server's preload where it started over with its model
worker's settings: the worker's modules imported, the server checked fit to fork and
back on its replica's CPUs (`deployments.llm.worker_server.ready`)."""

from deployments.llm import worker_server

worker_server.ready()
