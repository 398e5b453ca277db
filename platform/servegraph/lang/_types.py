"""Static type reasoning for validation: port types and edge compatibility."""

from __future__ import annotations

import inspect
import types
import typing
from typing import Annotated, Any, Union, get_args, get_origin

from pydantic import BaseModel

_NUMERIC_WIDENING = {(int, float), (bool, int)}


def describe(tp: Any) -> str:
    if tp is Any:
        return "Any"
    if isinstance(tp, type) and not get_args(tp):
        return tp.__name__
    return repr(tp).replace("typing.", "")


def compatible(source: Any, target: Any) -> bool:
    """Whether a value of type `source` may flow into a port typed `target`.

    Conservative where it matters (class mismatches, container element types),
    permissive where Python is (Any, int into float, T into Optional[T]).
    """
    source, target = _strip_annotated(source), _strip_annotated(target)
    if source is Any or target is Any or source == target:
        return True
    if _is_union(source):
        return all(compatible(s, target) for s in get_args(source))
    if _is_union(target):
        return any(compatible(source, t) for t in get_args(target))
    source_origin, target_origin = get_origin(source) or source, get_origin(target) or target
    if isinstance(source_origin, type) and isinstance(target_origin, type):
        if (source_origin, target_origin) in _NUMERIC_WIDENING:
            return True
        if not issubclass(source_origin, target_origin):
            return False
        source_args, target_args = get_args(source), get_args(target)
        if not source_args or not target_args or len(source_args) != len(target_args):
            return True  # a bare `list` on either side says nothing about elements
        return all(compatible(s, t) for s, t in zip(source_args, target_args, strict=True))
    return False


def field_type(tp: Any, field: str) -> tuple[bool, Any]:
    """The type of `tp.field`; (False, None) when `tp` certainly has no such field."""
    if tp is Any:
        return True, Any
    if _is_union(tp):  # Optional[Model].field
        members = [m for m in get_args(tp) if m is not type(None)]
        if len(members) == 1:
            return field_type(members[0], field)
        return True, Any
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        info = tp.model_fields.get(field)
        return (True, info.annotation) if info else (False, None)
    if (get_origin(tp) or tp) is dict:
        args = get_args(tp)
        return True, args[1] if args else Any
    return True, Any  # plain objects: attributes are not declared, trust the author


def function_ports(fn: Any) -> tuple[dict[str, tuple[Any, bool]], Any]:
    """A function's ports: name -> (type, required), and its return type."""
    hints = _hints(fn)
    ports: dict[str, tuple[Any, bool]] = {}
    for name, param in inspect.signature(fn).parameters.items():
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            continue
        ports[name] = (hints.get(name, Any), param.default is inspect.Parameter.empty)
    return ports, hints.get("return", Any)


def model_ports(model: type[BaseModel]) -> dict[str, tuple[Any, bool]]:
    return {
        name: (info.annotation, info.is_required()) for name, info in model.model_fields.items()
    }


def _hints(fn: Any) -> dict[str, Any]:
    try:
        return typing.get_type_hints(fn)
    except Exception:  # unresolvable forward refs: fall back to no declared types
        return {}


def _strip_annotated(tp: Any) -> Any:
    """`Annotated[T, constraints]` is a T for wiring purposes (constraints run at runtime)."""
    if get_origin(tp) is Annotated:
        return _strip_annotated(get_args(tp)[0])
    if _is_union(tp):
        members = tuple(_strip_annotated(a) for a in get_args(tp))
        return Union[members]  # noqa: UP007 - rebuilding from a runtime tuple
    return tp


def _is_union(tp: Any) -> bool:
    return get_origin(tp) in (Union, types.UnionType)
