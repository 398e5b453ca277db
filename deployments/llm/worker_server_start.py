"""First in the engine core's server's preload where the replica asked for its model
worker forked too (`deployments.llm.forkserver.start_early`): the server starts over
with the worker's settings (`deployments.llm.worker_server.start_over`), and, started
over, imports this module again to record them."""

from deployments.llm import worker_server

worker_server.start_over()
