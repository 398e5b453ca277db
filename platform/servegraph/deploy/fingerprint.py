"""Same model everywhere: each replica checks that it loaded the model files the
application was built with.

On a cluster every node prepares its own models (`cluster.yaml`'s set-up), so two nodes
can hold different files under the same path: a re-trained classifier on one, a stale
download on another. Nothing in Ray or Serve notices; answers would differ by replica.

The application builder (on the node that builds it: the head for `serve deploy`, the
driver for `servegraph run`) fingerprints the model folders and hands the result to the
replicas in their environment (`SERVEGRAPH_EXPECTED_MODEL`). Each replica fingerprints
what it loaded, and its health check fails on a difference, naming both nodes and both
fingerprints, so Serve marks the replica unhealthy and restarts it (it fails again until
the node's files are fixed) and the deployment's status carries the message. A builder
without the model files (a laptop writing a config) expects nothing, and nothing is
checked.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
from functools import lru_cache
from pathlib import Path
from typing import Any

ENV = "SERVEGRAPH_EXPECTED_MODEL"


def fingerprint(*folders: str | Path) -> str:
    """`sha256:<hex>` of every file under `folders`: its path in the folder, size and bytes."""
    files = []
    for folder in map(Path, folders):
        paths = [folder] if folder.is_file() else sorted(folder.rglob("*"))
        for path in (p for p in paths if p.is_file()):
            stat = path.stat()
            name = path.name if path == folder else str(path.relative_to(folder))
            files.append((str(path), name, stat.st_size, stat.st_mtime_ns))
    return _digest(tuple(files))


@lru_cache(maxsize=32)
def _digest(files: tuple[tuple[str, str, int, int], ...]) -> str:
    # Cached by the files' paths, sizes and times: a builder fingerprints a folder once
    # per process, however many applications it builds. The digest covers the bytes.
    digest = hashlib.sha256()
    for path, name, size, _ in files:
        digest.update(f"{name}\0{size}\0".encode())
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
    return "sha256:" + digest.hexdigest()


def identity(*folders: str | Path) -> str:
    """A cheap stand-in for `fingerprint` on this node: `files:<hex>` of every file's
    path in its folder, size and modification time (no bytes read: a model of many GB
    costs a few `stat`s). Files rewritten in place change it; the same files copied to
    another node with other times do too. A folder that does not exist counts as
    missing, not as an error."""
    digest = hashlib.sha256()
    for folder in map(Path, folders):
        if not folder.exists():
            digest.update(f"{folder}\0missing\0".encode())
            continue
        paths = [folder] if folder.is_file() else sorted(folder.rglob("*"))
        for path in (p for p in paths if p.is_file()):
            stat = path.stat()
            name = path.name if path == folder else str(path.relative_to(folder))
            digest.update(f"{name}\0{stat.st_size}\0{stat.st_mtime_ns}\0".encode())
    return "files:" + digest.hexdigest()[:16]


def this_node() -> str:
    """The node this process runs on, as an operator finds it: its IP and Ray node id."""
    try:
        import ray

        if ray.is_initialized():
            context = ray.get_runtime_context()
            return f"{ray.util.get_node_ip_address()} (Ray node {context.get_node_id()[:12]})"
    except Exception:
        pass
    return socket.gethostname()


def expected_env(*folders: str | Path) -> dict[str, str]:
    """What a builder puts in its replicas' environment: the fingerprint of `folders`
    here, and where here is. Empty when this node lacks the files."""
    if not all(Path(folder).exists() for folder in folders):
        return {}
    return {ENV: json.dumps({"fingerprint": fingerprint(*folders), "built_on": this_node()})}


def with_expected_model(options: dict[str, Any], *folders: str | Path) -> dict[str, Any]:
    """Serve deployment `options` whose replicas' environment carries `expected_env`."""
    env = expected_env(*folders)
    if not env:
        return options
    actor = dict(options.get("ray_actor_options") or {})
    runtime_env = dict(actor.get("runtime_env") or {})
    runtime_env["env_vars"] = {**(runtime_env.get("env_vars") or {}), **env}
    actor["runtime_env"] = runtime_env
    return {**options, "ray_actor_options": actor}


class SameModel:
    """Held by a replica: the fingerprint of the folders it loaded, checked against the
    one its application was built with."""

    def __init__(self, *loaded: str | Path) -> None:
        self.loaded = [str(folder) for folder in loaded]
        self.fingerprint = fingerprint(*loaded)
        expected = os.environ.get(ENV)
        self.expected: dict[str, str] | None = json.loads(expected) if expected else None

    def check(self) -> None:
        """Raise, naming both nodes, when this replica's model differs from the build's."""
        if self.expected is None or self.expected["fingerprint"] == self.fingerprint:
            return
        raise RuntimeError(
            f"model mismatch: this replica on {this_node()} loaded {', '.join(self.loaded)} "
            f"= {self.fingerprint[:19]}, but the application was built on "
            f"{self.expected['built_on']} with {self.expected['fingerprint'][:19]}. Prepare "
            "the same model on every node (python -m deployments.prepare), or put "
            "SERVEGRAPH_HOME on storage every node mounts."
        )
