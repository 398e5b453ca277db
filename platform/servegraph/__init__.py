"""servegraph: declarative multi-model pipelines on Ray Serve.

Describe a pipeline as a graph (`Pipeline`), check it (`validate`), compile it once
(`compile`: validated, imports resolved), run it in-process (`InProcessRuntime`) and
deploy it onto Ray Serve (`servegraph.deploy.planner` plans the applications,
`servegraph.serving.ingress` is the ingress). Importing this package never imports Ray or loads
a model.
"""

from servegraph.engine.checkpoints import Checkpoints as Checkpoints
from servegraph.engine.checkpoints import MemoryCheckpoints as MemoryCheckpoints
from servegraph.engine.checkpoints import SqliteCheckpoints as SqliteCheckpoints
from servegraph.engine.runtime import InProcessRuntime as InProcessRuntime
from servegraph.engine.runtime import NodeRecord as NodeRecord
from servegraph.engine.runtime import Pending as Pending
from servegraph.engine.runtime import RunEvent as RunEvent
from servegraph.engine.runtime import RunResult as RunResult
from servegraph.engine.runtime import Runtime as Runtime
from servegraph.engine.runtime import RunWaiting as RunWaiting
from servegraph.engine.runtime import Verdict as Verdict
from servegraph.errors import BudgetExceededError as BudgetExceededError
from servegraph.errors import CatalogError as CatalogError
from servegraph.errors import GraphValidationError as GraphValidationError
from servegraph.errors import InvalidInputError as InvalidInputError
from servegraph.errors import NodeFailedError as NodeFailedError
from servegraph.errors import NodeInputError as NodeInputError
from servegraph.errors import NodeQuotaError as NodeQuotaError
from servegraph.errors import NodeTimeoutError as NodeTimeoutError
from servegraph.errors import OverloadedError as OverloadedError
from servegraph.errors import PipelineRuntimeError as PipelineRuntimeError
from servegraph.errors import Problem as Problem
from servegraph.errors import QuotaExceededError as QuotaExceededError
from servegraph.errors import ServegraphError as ServegraphError
from servegraph.lang.calls import Method as Method
from servegraph.lang.calls import Server as Server
from servegraph.lang.catalog import Catalog as Catalog
from servegraph.lang.catalog import MethodContract as MethodContract
from servegraph.lang.catalog import ServerSpec as ServerSpec
from servegraph.lang.compiled import CompiledGraph as CompiledGraph
from servegraph.lang.compiled import compile as compile
from servegraph.lang.graph import AnswerCache as AnswerCache
from servegraph.lang.graph import Decision as Decision
from servegraph.lang.graph import DeploymentOverrides as DeploymentOverrides
from servegraph.lang.graph import Graph as Graph
from servegraph.lang.graph import Pipeline as Pipeline
from servegraph.lang.graph import Ref as Ref
from servegraph.lang.render import to_mermaid as to_mermaid
from servegraph.lang.render import to_text as to_text
from servegraph.lang.serialize import from_yaml as from_yaml
from servegraph.lang.serialize import load_yaml as load_yaml
from servegraph.lang.serialize import to_yaml as to_yaml
from servegraph.lang.validation import check as check
from servegraph.lang.validation import validate as validate
from servegraph.tenants import DEFAULT_TENANT as DEFAULT_TENANT
from servegraph.tenants import TENANT_PATTERN as TENANT_PATTERN
from servegraph.tenants import check_tenant as check_tenant

__all__ = [
    "DEFAULT_TENANT",
    "TENANT_PATTERN",
    "AnswerCache",
    "BudgetExceededError",
    "Catalog",
    "CatalogError",
    "Checkpoints",
    "CompiledGraph",
    "Decision",
    "DeploymentOverrides",
    "Graph",
    "GraphValidationError",
    "InProcessRuntime",
    "InvalidInputError",
    "MemoryCheckpoints",
    "Method",
    "MethodContract",
    "NodeFailedError",
    "NodeInputError",
    "NodeQuotaError",
    "NodeRecord",
    "NodeTimeoutError",
    "OverloadedError",
    "Pending",
    "Pipeline",
    "PipelineRuntimeError",
    "Problem",
    "QuotaExceededError",
    "Ref",
    "RunEvent",
    "RunResult",
    "RunWaiting",
    "Runtime",
    "ServegraphError",
    "Server",
    "ServerSpec",
    "SqliteCheckpoints",
    "Verdict",
    "check",
    "check_tenant",
    "compile",
    "from_yaml",
    "load_yaml",
    "to_mermaid",
    "to_text",
    "to_yaml",
    "validate",
]
