from __future__ import annotations

from typing import Annotated, Any

from pydantic import StringConstraints

from servegraph.lang._types import compatible
from tests.servegraph import toy

Email = Annotated[str, StringConstraints(pattern=r".+@.+")]


def test_compatibility_rules() -> None:
    assert compatible(int, float) and not compatible(float, int)
    assert compatible(str, str | None) and not compatible(str | None, str)
    assert compatible(Email | None, str | None) and compatible(Email, str)
    assert compatible(list[int], list[float]) and not compatible(list[str], list[int])
    assert compatible(list, list[int]) and compatible(Any, toy.Text)
    assert not compatible(toy.Text, toy.Vector) and not compatible(dict, toy.Text)
