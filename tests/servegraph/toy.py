"""Deterministic toy model servers and functions: the subject here is graph wiring."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from pydantic import BaseModel

from servegraph import Catalog, InvalidInputError, MethodContract, Pipeline, ServerSpec


class Text(BaseModel):
    text: str


class Vector(BaseModel):
    vector: list[float]


class Label(BaseModel):
    label: str
    score: float


class Question(BaseModel):
    question: str
    k: int = 2


class Answer(BaseModel):
    answer: str
    sources: list[str]


class Hits(BaseModel):
    hits: list[str]


class Search(BaseModel):
    vector: list[float]
    k: int = 3


class Sleep(BaseModel):
    seconds: float


class Echo(BaseModel):
    text: str


class ToyEmbedder:
    """Length and vowel count: deterministic, enough to wire a graph."""

    def __init__(self) -> None:
        self.calls = 0

    async def embed(self, request: Text) -> Vector:
        self.calls += 1
        if not request.text.strip():
            raise InvalidInputError("text", "is empty", "send at least one character")
        return Vector(vector=[len(request.text), sum(c in "aeiou" for c in request.text)])


class ToyIndex:
    async def search(self, request: Search) -> Hits:
        return Hits(hits=[f"doc{i}:{int(request.vector[0])}" for i in range(request.k)])


class ToyClassifier:
    async def classify(self, request: Text) -> Label:
        label = "billing" if "invoice" in request.text else "technical"
        return Label(label=label, score=0.9)


class Flaky:
    """Fails `failures` times, then answers; counts attempts."""

    def __init__(self, failures: int = 1) -> None:
        self.failures = failures
        self.attempts = 0

    async def echo(self, request: Text) -> Echo:
        self.attempts += 1
        if self.attempts <= self.failures:
            raise ConnectionError(f"transient failure {self.attempts}")
        return Echo(text=request.text)

    async def sleep(self, request: Sleep) -> Echo:
        await asyncio.sleep(request.seconds)
        return Echo(text="slept")


class Piece(BaseModel):
    text: str


class Writer:
    """Writes `text` back word by word: `write` all at once, `write_stream` as pieces.

    `fail_after` makes the stream raise after that many pieces (0: before any)."""

    def __init__(self, fail_after: int | None = None, failures: int = 1) -> None:
        self.fail_after = fail_after
        self.failures = failures
        self.calls: list[str] = []

    async def write(self, request: Text) -> Echo:
        self.calls.append("write")
        return Echo(text=request.text)

    async def write_stream(self, request: Text) -> AsyncIterator[Piece | Echo]:
        self.calls.append("write_stream")
        for i, word in enumerate(request.text.split(" ")):
            if i == self.fail_after and self.failures > 0:
                self.failures -= 1
                raise ConnectionError(f"stream broke after {i} piece(s)")
            await asyncio.sleep(0)
            yield Piece(text=word if i == 0 else " " + word)
        yield Echo(text=request.text)


CATALOG = Catalog(
    [
        ServerSpec(
            "writer",
            {"write": MethodContract(Text, Echo, chunk=Piece, stream_method="write_stream")},
            "x:y",
            "W",
            "/w",
        ),
        ServerSpec("embedder", {"embed": MethodContract(Text, Vector)}, "x:y", "E", "/e"),
        ServerSpec("index", {"search": MethodContract(Search, Hits)}, "x:y", "I", "/i"),
        ServerSpec("classifier", {"classify": MethodContract(Text, Label)}, "x:y", "C", "/c"),
        ServerSpec(
            "flaky",
            {"echo": MethodContract(Text, Echo), "sleep": MethodContract(Sleep, Echo)},
            "x:y",
            "F",
            "/f",
        ),
    ]
)


def servers(**extra: object) -> dict[str, object]:
    return {
        "embedder": ToyEmbedder(),
        "index": ToyIndex(),
        "classifier": ToyClassifier(),
        "flaky": Flaky(),
        "writer": Writer(),
        **extra,
    }


# -- functions used as nodes ------------------------------------------------------


def make_answer(question: str, hits: list[str]) -> Answer:
    return Answer(answer=f"{question} -> {hits[0]}", sources=hits)


def shout(text: str) -> str:
    return text.upper()


def whisper(text: str) -> str:
    return text.lower()


async def slow_upper(text: str, seconds: float = 0.2) -> str:
    await asyncio.sleep(seconds)
    return text.upper()


ARRIVED: set[str] = set()


async def rendezvous(text: str, me: str, other: str) -> str:
    """Returns once `other` has started too; fails if it never runs alongside."""
    ARRIVED.add(me)
    for _ in range(400):
        if other in ARRIVED:
            return text
        await asyncio.sleep(0.005)
    raise TimeoutError(f"{other} never ran alongside {me}")


def join_two(upper: str, lower: str) -> str:
    return f"{upper}|{lower}"


def fallback_text(text: str) -> Echo:
    return Echo(text=f"fallback:{text}")


class Counter(BaseModel):
    value: int
    history: list[int] = []


def increment(value: int, history: list[int]) -> Counter:
    return Counter(value=value + 1, history=[*history, value])


def reached_three(state: Counter) -> bool:
    return state.value >= 3


def to_text_request(text: str) -> Text:
    return Text(text=text)


def length(text: str) -> int:
    return len(text)


# -- graphs ----------------------------------------------------------------------


def rag() -> Pipeline:
    p = Pipeline("rag", input=Question, output=Answer)
    emb = p.call("embed", "embedder", "embed", text=p.input.question)
    hits = p.call("retrieve", "index", "search", vector=emb.vector, k=p.input.k)
    answer = p.function("answer", make_answer, question=p.input.question, hits=hits.hits)
    p.returns(answer)
    return p


def case(fn) -> Pipeline:
    p = Pipeline(f"case_{fn.__name__}", input=Text, output=str)
    p.returns(p.function("transform", fn, text=p.input.text))
    return p


def routed() -> Pipeline:
    p = Pipeline("routed", input=Text, output=str)
    label = p.call("classify", "classifier", "classify", text=p.input.text)
    p.returns(
        p.switch(
            "route",
            on=label.label,
            cases={"billing": case(shout), "technical": case(whisper)},
            text=p.input.text,
        )
    )
    return p


def counter_body() -> Pipeline:
    p = Pipeline("step", input=Counter, output=Counter)
    p.returns(p.function("increment", increment, value=p.input.value, history=p.input.history))
    return p


def written(**options: object) -> Pipeline:
    """Stream the writer's pieces, then shout its complete text; `options` go to the call."""
    p = Pipeline("written", input=Text, output=str)
    draft = p.call("draft", "writer", "write", text=p.input.text, stream=True, **options)
    p.returns(p.function("shout", shout, text=draft.text))
    return p
