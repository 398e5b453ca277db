"""What a model server's author uses from the framework, in one place.

A model server (`deployments/<server>/`) imports `servegraph` for its catalog entry
(`ServerSpec`, `MethodContract`) and this module for the rest: batching across callers,
span annotation, the input error that becomes a 422 naming the field, the gateway that
gives the server its REST surface (API keys checked), the same key check for a
route of an app the server does not build itself (`guard_endpoint`), and the check that
every replica loaded the model files its application was built with (`SameModel`,
`with_expected_model`), taking many callers' requests in one handle call
(`accepts_merged_calls`), and what each request cost the replica (`metered`, `Meter`, `prices`;
`allowance`, the most a call may cost when its request has a budget; `report_tokens`,
the LLM tokens a call has used so far, for a client that sees them as a reply arrives,
and `tokens_counted`, whether it should), and the autoscaling that sizes a server by the
pipelines' arrivals (`graph_autoscaling`), and a benchmark's simulated models: the curves
a forward pass waits instead of running (`simulated_curves`, None unless a benchmark
asks), a simulated encoder's vector (`simulated_vector`) and a simulated LLM's
guided-JSON reply (`simulated_json`). The LLM server also takes the platform's settings
(`AuthSettings` for its docs pages, `router_actor_options` for its router's placement),
its prompt-size estimate (`PromptEstimate`, `CHARS_PER_TOKEN`), and `resolve` (an
import path's object) for the set-up steps. Everything else in the framework is private
to it, and `tests/test_import_rules.py` holds model servers to this module and
`servegraph`. Importing this module imports neither Ray nor a model.
"""

from __future__ import annotations

from typing import Any

from servegraph.cost.budget import allowance as allowance
from servegraph.cost.metering import CHARGE_ITEM as CHARGE_ITEM
from servegraph.cost.metering import Meter as Meter
from servegraph.cost.metering import attach as attach_charge
from servegraph.cost.metering import metered as metered
from servegraph.cost.metering import replica_resources as replica_resources
from servegraph.cost.prices import prices as prices
from servegraph.deploy.fingerprint import SameModel as SameModel
from servegraph.deploy.fingerprint import expected_env as expected_model_env
from servegraph.deploy.fingerprint import with_expected_model as with_expected_model
from servegraph.deploy.scaling.settings import (
    check_graph_autoscaling as check_graph_autoscaling,
)
from servegraph.deploy.scaling.settings import graph_autoscaling as graph_autoscaling
from servegraph.deploy.simulated import ENV as SIMULATED_MODELS_ENV
from servegraph.deploy.simulated import curves as simulated_curves
from servegraph.deploy.simulated import instance as simulated_json
from servegraph.deploy.simulated import vector as simulated_vector
from servegraph.engine.tokens import CHARS_PER_TOKEN as CHARS_PER_TOKEN
from servegraph.engine.tokens import PromptEstimate as PromptEstimate
from servegraph.engine.tokens import counted as tokens_counted
from servegraph.engine.tokens import report as report_tokens
from servegraph.errors import InvalidInputError as InvalidInputError
from servegraph.lang.graph import resolve as resolve
from servegraph.security.endpoints import guard_endpoint as guard_endpoint
from servegraph.security.keys import AuthSettings as AuthSettings
from servegraph.serving.batching import Batcher as Batcher
from servegraph.serving.batching import BatchStats as BatchStats
from servegraph.serving.http import offline_docs as offline_docs
from servegraph.serving.merging import accepts_merged_calls as accepts_merged_calls
from servegraph.settings import router_actor_options as router_actor_options
from servegraph.telemetry.tracing import annotate as annotate

__all__ = [
    "CHARGE_ITEM",
    "CHARS_PER_TOKEN",
    "SIMULATED_MODELS_ENV",
    "AuthSettings",
    "BatchStats",
    "Batcher",
    "InvalidInputError",
    "Meter",
    "PromptEstimate",
    "SameModel",
    "accepts_merged_calls",
    "allowance",
    "annotate",
    "attach_charge",
    "cancel_off_loop",
    "check_graph_autoscaling",
    "expected_model_env",
    "gateway_app",
    "graph_autoscaling",
    "guard_endpoint",
    "metered",
    "offline_docs",
    "prices",
    "replica_resources",
    "report_tokens",
    "resolve",
    "router_actor_options",
    "simulated_curves",
    "simulated_json",
    "simulated_vector",
    "tokens_counted",
    "with_expected_model",
]


def cancel_off_loop(response: Any) -> None:
    """Cancel a Serve handle call (a `DeploymentResponse` or a streaming one) from a
    thread, never blocking the event loop (`servegraph.serving.handles.cancel_off_loop`)."""
    from servegraph.serving.handles import cancel_off_loop as cancel  # imports Ray: only when used

    cancel(response)


def gateway_app(server: str, model: Any, catalog_path: str | None = None) -> Any:
    """The Serve application of model server `server`: its REST surface (a gateway
    deployment, `servegraph.serving.gateway`) in front of `model`, the bound model deployment
    that pipelines call by handle."""
    from servegraph.serving.gateway import gateway_app as build  # imports Ray: only when building

    return build(server, model, catalog_path)
