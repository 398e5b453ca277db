from __future__ import annotations

from servegraph import to_mermaid, to_text
from tests.servegraph import toy


def test_mermaid_shows_kinds_servers_edges_and_subgraphs() -> None:
    chart = to_mermaid(toy.routed().build())
    assert chart.startswith("flowchart TD")
    assert "call classifier.classify" in chart
    assert 'subgraph route["route: switch on classify.label"]' in chart
    assert "input --> classify" in chart and "route --> output" in chart


def test_text_rendering_lists_wiring() -> None:
    text = to_text(toy.rag().build())
    assert "embed [call embedder.embed](text=input.question)" in text
    assert "returns answer" in text


def test_a_pipeline_is_described_by_its_input_model_s_own_docstring_only() -> None:
    from pydantic import BaseModel

    from servegraph import Pipeline

    class Documented(BaseModel):
        """Ask about an order."""

        text: str

    class Bare(BaseModel):  # inherits BaseModel's long docstring, which is not about it
        text: str

    def described(model: type[BaseModel]) -> str:
        p = Pipeline("p", input=model, output=str)
        p.returns(p.input.text)
        return p.build().description

    assert described(Documented) == "Ask about an order."
    assert described(Bare) == ""
