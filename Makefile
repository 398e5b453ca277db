# The two commands a fresh machine needs: `make run` and `make test`.
# Both install everything first (idempotent; a second run does nothing).
.PHONY: install run test lint bench observe

export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

install:
	@bash scripts/install.sh

run: install
	.venv/bin/servegraph run

test: install
	.venv/bin/python -m pytest

# Prometheus (Debian's package) on the platform `make run` serves, with the alert rules.
observe: install
	.venv/bin/servegraph observe

lint:
	.venv/bin/ruff check . && .venv/bin/ruff format --check . && .venv/bin/mypy

bench: install
	.venv/bin/python -m benchmarks.run_all
