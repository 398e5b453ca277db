"""The alert rules (`dashboards/alerts.yaml`) pass `promtool check rules`, and
`promtool test rules` shows each alert firing on the synthetic series of its failure,
with its labels and annotations, and none firing on a healthy platform."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

RULES = Path(__file__).resolve().parents[1] / "dashboards" / "alerts.yaml"
PROMTOOL = shutil.which("promtool")
REQUESTS = "ray_servegraph_pipeline_requests_total"
LATENCY = "ray_servegraph_pipeline_latency_ms"
STARTS = "ray_serve_deployment_replica_starts_total"

# One failure per alert: series (1 sample a minute), when to look, the labels expected.
FAILING = {
    "rag answers 23% 502s": (
        {
            f'{REQUESTS}{{pipeline="rag",status="200"}}': "0+100x120",
            f'{REQUESTS}{{pipeline="rag",status="502"}}': "0+30x120",
            f'{LATENCY}_count{{pipeline="rag"}}': "0+130x120",
            f'{LATENCY}_bucket{{pipeline="rag",le="10000.0"}}': "0+130x120",
        },
        "70m",
        {
            "PipelineErrorBudgetFastBurn": {"pipeline": "rag", "severity": "page"},
            "PipelineErrorBudgetSlowBurn": {"pipeline": "rag", "severity": "ticket"},
            "PipelineHigh5xxRatio": {"pipeline": "rag", "severity": "page"},
        },
    ),
    "triage answers a third of requests after 10 s": (
        {
            f'{REQUESTS}{{pipeline="triage",status="200"}}': "0+90x120",
            f'{LATENCY}_count{{pipeline="triage"}}': "0+90x120",
            f'{LATENCY}_bucket{{pipeline="triage",le="10000.0"}}': "0+60x120",
        },
        "70m",
        {"PipelineErrorBudgetFastBurn": {"pipeline": "triage", "severity": "page"}},
    ),
    "rag sheds 17% of requests": (
        {
            f'{REQUESTS}{{pipeline="rag",status="200"}}': "0+100x60",
            f'{REQUESTS}{{pipeline="rag",status="503"}}': "0+10x60",
            f'{REQUESTS}{{pipeline="rag",status="429"}}': "0+10x60",
        },
        "30m",
        {"PipelineShedding": {"pipeline": "rag", "severity": "ticket"}},
    ),
    "the LLM's queue grows": (
        {'ray_serve_deployment_queued_queries{application="llm",deployment="LLMServer"}': "0+2x60"},
        "40m",
        {
            "ServeQueueGrowing": {
                "application": "llm",
                "deployment": "LLMServer",
                "severity": "ticket",
            }
        },
    ),
    "embedder replicas crash-loop": (
        {f'{STARTS}{{application="embedder",deployment="Embedder"}}': "1 1 1 2 3 4 5 6 6 6"},
        "9m",
        {
            "ServeReplicaRestarts": {
                "application": "embedder",
                "deployment": "Embedder",
                "severity": "page",
            }
        },
    ),
    "first tokens take 1-2.5 s": (
        {
            'ray_vllm_time_to_first_token_seconds_bucket{le="1.0"}': "0x30",
            'ray_vllm_time_to_first_token_seconds_bucket{le="2.5"}': "0+10x30",
            'ray_vllm_time_to_first_token_seconds_bucket{le="+Inf"}': "0+10x30",
        },
        "20m",
        {"LLMTimeToFirstTokenHigh": {"severity": "ticket"}},
    ),
    "the KV cache is 95% used": (
        {'ray_vllm_kv_cache_usage_perc{model_name="smollm2"}': "0.95x20"},
        "10m",
        {"LLMKVCacheNearFull": {"severity": "ticket"}},
    ),
    "triage traffic stops": (
        {f'{REQUESTS}{{pipeline="triage",status="200"}}': "0+10x60 600x60"},
        "100m",
        {"PipelineNoTraffic": {"pipeline": "triage", "severity": "ticket"}},
    ),
}

HEALTHY = {
    f'{REQUESTS}{{pipeline="rag",status="200"}}': "0+100x120",
    f'{REQUESTS}{{pipeline="rag",status="422"}}': "0+2x120",  # callers' mistakes
    f'{LATENCY}_count{{pipeline="rag"}}': "0+102x120",
    f'{LATENCY}_bucket{{pipeline="rag",le="10000.0"}}': "0+102x120",
    'ray_serve_deployment_queued_queries{application="llm",deployment="LLMServer"}': "5x120",
    f'{STARTS}{{application="llm",deployment="LLMServer"}}': "1x120",
    'ray_vllm_time_to_first_token_seconds_bucket{le="0.5"}': "0+10x120",
    'ray_vllm_time_to_first_token_seconds_bucket{le="+Inf"}': "0+10x120",
    'ray_vllm_kv_cache_usage_perc{model_name="smollm2"}': "0.3x120",
}


def alerts() -> dict[str, dict[str, Any]]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return {r["alert"]: r for g in groups for r in g["rules"] if "alert" in r}


def annotations(rule: dict[str, Any], labels: dict[str, str]) -> dict[str, str]:
    """The rule's annotations as Prometheus renders them for `labels`."""
    return {
        key: re.sub(r"\{\{ \$labels\.(\w+) \}\}", lambda m: labels[m.group(1)], text)
        for key, text in rule["annotations"].items()
    }


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL, "promtool is missing: `make install` installs Debian's prometheus"
    return subprocess.run([PROMTOOL, *args], capture_output=True, text=True, timeout=120)


def test_the_rules_are_valid_and_each_alert_says_what_to_do() -> None:
    done = promtool("check", "rules", str(RULES))
    assert done.returncode == 0, done.stdout + done.stderr
    for name, rule in alerts().items():
        assert {"summary", "runbook"} <= set(rule["annotations"]), name
        assert rule["labels"]["severity"] in ("page", "ticket"), name


def test_every_alert_is_tested_by_a_failure() -> None:
    tested = {name for _, _, expected in FAILING.values() for name in expected}
    assert tested == set(alerts())


def test_each_alert_fires_on_its_failure_and_none_on_a_healthy_platform(
    tmp_path: Path,
) -> None:
    rules = alerts()
    tests = []
    for _failure, (series, at, expected) in FAILING.items():
        tests.append(
            {
                "interval": "1m",
                "input_series": [{"series": s, "values": v} for s, v in series.items()],
                "alert_rule_test": [
                    {
                        "eval_time": at,
                        "alertname": name,
                        "exp_alerts": [
                            {
                                "exp_labels": labels,
                                "exp_annotations": annotations(rules[name], labels),
                            }
                        ],
                    }
                    for name, labels in expected.items()
                ],
            }
        )
    tests.append(
        {
            "interval": "1m",
            "input_series": [{"series": s, "values": v} for s, v in HEALTHY.items()],
            "alert_rule_test": [
                {"eval_time": at, "alertname": name, "exp_alerts": []}
                for name in rules
                for at in ("30m", "100m")
            ],
        }
    )
    spec = tmp_path / "alerts_test.yaml"
    spec.write_text(
        yaml.safe_dump({"rule_files": [str(RULES)], "evaluation_interval": "1m", "tests": tests})
    )
    done = promtool("test", "rules", str(spec))
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize("name", sorted(alerts()))
def test_alert_names_are_unique_and_documented_in_the_readme(name: str) -> None:
    readme = (RULES.parents[1] / "README.md").read_text()
    assert name in readme, f"README's alert table lacks {name}"
