"""The support records server: order and account look-ups for the triage agent's tools,
and the actions a support agent takes on an order (refund, cancel), each applied once
per idempotency key; the support database is SQLite on the head node's disk, built from
`seed.sql`.

`SERVER` is its catalog entry. Importing this package imports only pydantic models.
"""

from deployments.records import contract as c
from servegraph import Method, Server, ServerSpec


class RecordsMethods(Server, name="records"):
    """The records's methods, typed: a pipeline calls ``records.<method>(<fields>)``
    (`servegraph.lang.calls`); `SERVER` takes its contracts from here."""

    lookup_order = Method(c.LookupRequest, c.Lookup, idempotent=True)
    lookup_account = Method(c.LookupRequest, c.Lookup, idempotent=True)
    # Writes, applied once per idempotency key (a run's own, `servegraph.lang.catalog`).
    refund_order = Method(c.RefundRequest, c.ActionResult, **c.APPLIED_ONCE)
    cancel_order = Method(c.CancelRequest, c.ActionResult, **c.APPLIED_ONCE)


records = RecordsMethods()

SERVER = ServerSpec(
    name=RecordsMethods.name,
    methods=RecordsMethods.contracts(),
    app_builder="deployments.records.server:app",
    deployment="SupportRecords",
    serve_class="deployments.records.server:SupportRecordsDeployment",
    merged_calls=True,
    in_process="deployments.records.model:SupportRecords",
    prepare="deployments.records.model:prepare",
    route_prefix="/records",
    description="order and account look-ups, refunds and cancellations (SQLite on the head node)",
)
