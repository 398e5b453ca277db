"""Benchmarks: the platform against its reference (the raw model, the monolith) in one run.

httpx logs a line per request at INFO, which Ray's logging set-up turns into a JSON line
on the console: for a load generator, CPU spent on its own console and a flood that hides
the figures. Benchmarks log httpx's warnings only."""

import logging

logging.getLogger("httpx").setLevel(logging.WARNING)
