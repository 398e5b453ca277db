"""The classifier model server: a support ticket's category, dynamically batched.

`SERVER` is its catalog entry. Importing this package imports only pydantic models.
"""

from deployments.classifier import contract as c
from servegraph import Method, Server, ServerSpec
from servegraph.server import BatchStats


class ClassifierMethods(Server, name="classifier"):
    """The classifier's methods, typed: a pipeline calls ``classifier.<method>(<fields>)``
    (`servegraph.lang.calls`); `SERVER` takes its contracts from here."""

    classify = Method(c.ClassifyRequest, c.Classification, idempotent=True)
    classify_batch = Method(c.ClassifyBatchRequest, c.ClassifyBatchResponse, idempotent=True)


classifier = ClassifierMethods()

SERVER = ServerSpec(
    name=ClassifierMethods.name,
    methods=ClassifierMethods.contracts(),
    app_builder="deployments.classifier.server:app",
    deployment="Classifier",
    serve_class="deployments.classifier.server:ClassifierDeployment",
    merged_calls=True,
    in_process="deployments.classifier.model:Classifier",
    models="deployments.classifier.model:model_folders",
    prepare="deployments.classifier.training:prepare",
    route_prefix="/classifier",
    # A replica's start on the 2-core machine (README, "A replica's cold start"): a call
    # to this server scaled to zero that cannot wait this long is refused at once.
    cold_start_s=9.2,
    reads={"info": ("info", c.ClassifierInfo), "stats": ("batch_stats", BatchStats)},
    description="support-ticket category classifier, dynamically batched",
)
