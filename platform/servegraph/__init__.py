"""servegraph: declarative multi-model pipelines on Ray Serve.

Describe a pipeline as a graph (`Pipeline`), check it (`validate`), compile it once
(`compile`: validated, imports resolved), run it in-process (`InProcessRuntime`) and
deploy it onto Ray Serve (`servegraph.planner` plans the applications,
`servegraph.serving` is the ingress). Importing this package never imports Ray or loads
a model.
"""

from servegraph.catalog import Catalog as Catalog
from servegraph.catalog import MethodContract as MethodContract
from servegraph.catalog import ServerSpec as ServerSpec
from servegraph.compiled import CompiledGraph as CompiledGraph
from servegraph.compiled import compile as compile
from servegraph.errors import BudgetExceededError as BudgetExceededError
from servegraph.errors import CatalogError as CatalogError
from servegraph.errors import GraphValidationError as GraphValidationError
from servegraph.errors import InvalidInputError as InvalidInputError
from servegraph.errors import NodeFailedError as NodeFailedError
from servegraph.errors import NodeInputError as NodeInputError
from servegraph.errors import NodeTimeoutError as NodeTimeoutError
from servegraph.errors import OverloadedError as OverloadedError
from servegraph.errors import PipelineRuntimeError as PipelineRuntimeError
from servegraph.errors import Problem as Problem
from servegraph.errors import ServegraphError as ServegraphError
from servegraph.graph import DeploymentOverrides as DeploymentOverrides
from servegraph.graph import Graph as Graph
from servegraph.graph import Pipeline as Pipeline
from servegraph.graph import Ref as Ref
from servegraph.render import to_mermaid as to_mermaid
from servegraph.render import to_text as to_text
from servegraph.runtime import InProcessRuntime as InProcessRuntime
from servegraph.runtime import NodeRecord as NodeRecord
from servegraph.runtime import RunEvent as RunEvent
from servegraph.runtime import RunResult as RunResult
from servegraph.runtime import Runtime as Runtime
from servegraph.serialize import from_yaml as from_yaml
from servegraph.serialize import load_yaml as load_yaml
from servegraph.serialize import to_yaml as to_yaml
from servegraph.validation import check as check
from servegraph.validation import validate as validate

__all__ = [
    "BudgetExceededError",
    "Catalog",
    "CatalogError",
    "CompiledGraph",
    "DeploymentOverrides",
    "Graph",
    "GraphValidationError",
    "InProcessRuntime",
    "InvalidInputError",
    "MethodContract",
    "NodeFailedError",
    "NodeInputError",
    "NodeRecord",
    "NodeTimeoutError",
    "OverloadedError",
    "Pipeline",
    "PipelineRuntimeError",
    "Problem",
    "Ref",
    "RunEvent",
    "RunResult",
    "Runtime",
    "ServegraphError",
    "ServerSpec",
    "check",
    "compile",
    "from_yaml",
    "load_yaml",
    "to_mermaid",
    "to_text",
    "to_yaml",
    "validate",
]
