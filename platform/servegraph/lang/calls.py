"""Typed calls: a model server's methods as objects a pipeline calls, so that the type
checker and an editor know the server, the method, the request's fields and the
response's.

A model server declares its methods once, on a `Server` subclass; its catalog entry
takes its contracts from there (`ServerSpec(methods=EmbedderMethods.contracts(), ...)`), so
the two cannot disagree:

    class EmbedderMethods(Server, name="embedder"):
        embed = Method(EmbedRequest, EmbedResponse, idempotent=True)
        embed_one = Method(EmbedOneRequest, Embedding, idempotent=True)

    embedder = EmbedderMethods()

A pipeline then writes ``p.call("embed", embedder.embed_one(text=p.input.question))``:
`embed_one(...)` takes the request model's fields as keyword arguments (a misspelt one
fails mypy, with the pydantic plugin's `init_forbid_extra`), and `p.call` returns the
node's output typed as the method's response (`Embedding`), so ``.vector`` completes
and ``.vectr`` fails the check. At build time that output is a `Ref` to the node's
output, as every node method returns; only its static type is the response's.

Strings keep working (``p.call("embed", "embedder", "embed_one", text=...)``, and
YAML graphs): both build the same `CallNode`, and `servegraph validate` checks both
against the catalog, every problem at once.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, Generic, ParamSpec, TypeVar

from pydantic import BaseModel

from servegraph.lang.catalog import MethodContract

P = ParamSpec("P")
R = TypeVar("R", bound=BaseModel)


@dataclass(frozen=True)
class Bound(Generic[R]):
    """A method with its request's fields wired (refs or constants): what `Pipeline.call`
    turns into a call node."""

    server: str
    method: str
    ports: dict[str, Any]


class Method(Generic[P, R]):
    """One method of a model server: its request model (whose fields are the call's
    keyword arguments) and its response model, with the rest of its `MethodContract`
    (`idempotent`, `writes`, `usage`, streaming, ...) as keyword arguments."""

    def __init__(self, request: Callable[P, BaseModel], response: type[R], **contract: Any):
        if not (isinstance(request, type) and issubclass(request, BaseModel)):
            raise TypeError(f"a method's request is a pydantic model class, not {request!r}")
        self.contract = MethodContract(request, response, **contract)
        self.server = ""
        self.name = ""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __call__(self, *args: P.args, **ports: P.kwargs) -> Bound[R]:
        if args:
            raise TypeError(f"{self.server}.{self.name}: pass the request's fields by name")
        if not self.server:
            raise TypeError(f"{self.name}: a Method is called through its Server subclass")
        return Bound(self.server, self.name, dict(ports))

    def __repr__(self) -> str:
        return f"Method({self.server}.{self.name})"


class Server:
    """A model server's methods, declared once (module docstring): subclass with
    ``name=`` (the catalog name) and one `Method` attribute per method."""

    name: ClassVar[str]

    def __init_subclass__(cls, *, name: str, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls.name = name
        for method in cls._methods().values():
            method.server = name

    @classmethod
    def _methods(cls) -> dict[str, Method[Any, Any]]:
        return {k: v for k, v in vars(cls).items() if isinstance(v, Method)}

    @classmethod
    def contracts(cls) -> dict[str, MethodContract]:
        """Method name -> contract: the catalog entry's `methods`."""
        return {name: method.contract for name, method in cls._methods().items()}

    def __repr__(self) -> str:
        return f"<{self.name} methods: {sorted(self._methods())}>"
