"""A real Prometheus for the platform: Debian's `prometheus`, scraping every Ray node's
metrics endpoint through the service-discovery file Ray keeps up to date, with the
project's alert rules loaded. Used by `servegraph observe` (`make observe`) and by the
tests that run the Grafana dashboard's queries.

Nothing is downloaded: the binary comes from the project's set-up (`apt-get install
prometheus`, scripts/install.sh), the rules from the repository.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import yaml

# Where Ray writes the scrape targets of every node (`ray start` and `ray.init` keep it
# current as nodes come and go), under Ray's temp dir.
RAY_SERVICE_DISCOVERY = Path("/tmp/ray/prom_metrics_service_discovery.json")


@dataclass(frozen=True)
class Prometheus:
    url: str

    def query(self, expr: str) -> list[dict[str, Any]]:
        """An instant query's result vector (empty when no series matches)."""
        answer = httpx.get(f"{self.url}/api/v1/query", params={"query": expr}, timeout=30)
        answer.raise_for_status()
        result: list[dict[str, Any]] = answer.json()["data"]["result"]
        return result

    def targets(self) -> list[dict[str, Any]]:
        answer = httpx.get(f"{self.url}/api/v1/targets", timeout=30)
        answer.raise_for_status()
        active: list[dict[str, Any]] = answer.json()["data"]["activeTargets"]
        return active

    def rule_groups(self) -> list[str]:
        answer = httpx.get(f"{self.url}/api/v1/rules", timeout=30)
        answer.raise_for_status()
        return [g["name"] for g in answer.json()["data"]["groups"]]


def config(service_discovery: Path, rules: Path | None, scrape_s: float = 5) -> dict[str, Any]:
    """prometheus.yml: scrape Ray's targets every `scrape_s`, evaluate `rules`."""
    return {
        "global": {"scrape_interval": f"{scrape_s:g}s", "evaluation_interval": f"{scrape_s:g}s"},
        "rule_files": [str(rules)] if rules else [],
        "scrape_configs": [
            {"job_name": "ray", "file_sd_configs": [{"files": [str(service_discovery)]}]}
        ],
    }


@contextmanager
def prometheus(
    *,
    port: int,
    rules: Path | None,
    service_discovery: Path = RAY_SERVICE_DISCOVERY,
    data_dir: Path | None = None,
    binary: str | None = None,
    timeout_s: float = 60,
) -> Iterator[Prometheus]:
    """Run Prometheus on 127.0.0.1:`port` until the block exits."""
    binary = binary or shutil.which("prometheus")
    if binary is None:
        raise FileNotFoundError("prometheus is not installed: run `make install` (Debian package)")
    with tempfile.TemporaryDirectory(prefix="servegraph-prometheus-") as tmp:
        config_file = Path(tmp) / "prometheus.yml"
        config_file.write_text(yaml.safe_dump(config(service_discovery, rules)))
        log = (Path(tmp) / "prometheus.log").open("w")
        process = subprocess.Popen(
            [
                binary,
                f"--config.file={config_file}",
                f"--storage.tsdb.path={data_dir or Path(tmp) / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
                "--web.enable-lifecycle",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + timeout_s
            while True:
                if process.poll() is not None:
                    log.flush()
                    raise RuntimeError(
                        f"prometheus exited: {(Path(tmp) / 'prometheus.log').read_text()[-2000:]}"
                    )
                try:
                    if httpx.get(f"{url}/-/ready", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    raise TimeoutError(f"prometheus not ready on {url} after {timeout_s}s")
                time.sleep(0.5)
            yield Prometheus(url)
        finally:
            process.terminate()
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
            log.close()
