"""The `uv pip install` command for the package sources pip is configured with here.

    python scripts/uv_sources.py UV pip install ...   # that command, NUL-separated, with
        # the sources' arguments after it (and the certificate in its environment); exit 3
        # where pip's configuration has a setting uv is not given

uv reads no pip configuration (pip.conf, PIP_* variables). `scripts/install.sh` installs
with uv only where this hands over everything pip's install would use: find-links,
indexes, constraints, trusted hosts, `no-index` and the certificate, with pip's rule of
the best version across every index. Anything else that changes where packages come
from (a proxy, a client certificate, an unknown key) keeps the install on pip.

Read from `pip config list`, which prints pip's merged configuration as `section.key=
'value'` (Python literals): the `:env:` (PIP_* variables), `install` and `global`
sections are the ones `pip install` reads, in that order of precedence.
"""

from __future__ import annotations

import ast
import subprocess
import sys

LISTS = {
    "find-links": "--find-links",
    "extra-index-url": "--extra-index-url",
    "constraint": "--constraint",
    "trusted-host": "--allow-insecure-host",
}
SINGLE = {"index-url", "cert"}  # one value: the first section in PRECEDENCE wins
# Settings that change nothing about which packages are installed from where.
HARMLESS = {
    "cache-dir",
    "default-timeout",
    "disable-pip-version-check",
    "no-cache-dir",
    "no-input",
    "progress-bar",
    "quiet",
    "retries",
    "root-user-action",
    "timeout",
    "verbose",
}
PRECEDENCE = {":env:": 0, "install": 1, "global": 2}  # pip install: env, then install, global
TRUE = {"1", "true", "yes", "on"}


def uv_command(listed: str, command: list[str]) -> list[str] | None:
    """`command` (uv's install) with the sources `pip config list`'s output names, run
    by `env` with pip's certificate as uv reads it (SSL_CERT_FILE); None where uv would
    not be given everything (a setting it has no counterpart for here)."""
    lists: dict[str, list[str]] = {}
    single: dict[str, tuple[int, str]] = {}
    no_index = False
    for line in listed.splitlines():
        name, sep, literal = line.partition("=")
        section, _, key = name.rpartition(".")
        if not sep or section not in PRECEDENCE:
            continue  # another command's section (download, wheel, ...)
        value = str(ast.literal_eval(literal))
        rank = PRECEDENCE[section]
        if key in LISTS:
            items = lists.setdefault(key, [])
            items.extend(item for item in value.split() if item not in items)
        elif key in SINGLE:
            if key not in single or rank < single[key][0]:
                single[key] = (rank, value.strip())
        elif key == "no-index":
            no_index = no_index or value.strip().lower() in TRUE
        elif key not in HARMLESS:
            return None
    run = ["env"]
    if "cert" in single:
        run.append(f"SSL_CERT_FILE={single['cert'][1]}")
    run += [*command, "--index-strategy", "unsafe-best-match"]
    if no_index:
        run.append("--no-index")
    if "index-url" in single:
        run += ["--index-url", single["index-url"][1]]
    for key, flag in LISTS.items():
        for item in lists.get(key, []):
            run += [flag, item]
    return run


def main(command: list[str]) -> int:
    listed = subprocess.run(
        [sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True
    ).stdout
    run = uv_command(listed, command)
    if run is None:
        return 3
    sys.stdout.write("".join(f"{argument}\0" for argument in run))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
