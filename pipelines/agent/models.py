"""Request, state and response models of the triage agent."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, Field, StringConstraints

Email = Annotated[
    str,
    StringConstraints(strip_whitespace=True, to_lower=True, pattern=r"^[\w.+-]+@[\w-]+\.[\w.]+$"),
]


class Ticket(BaseModel):
    text: Annotated[str, StringConstraints(strip_whitespace=True, min_length=3, max_length=4000)]
    email: Email | None = Field(
        None,
        description=(
            "The customer's email, as the calling application authenticated them. Order "
            "and account look-ups are made for this customer only (an address in the "
            "text is never used); without it the agent discloses no order or account."
        ),
    )


class Route(BaseModel):
    team: str
    label: str
    confidence: float
    tools: list[str] = Field(description="Tools this team's agent may use.")


class RouteInput(BaseModel):
    label: str
    confidence: float


class Step(BaseModel):
    tool: str
    input: str
    output: str
    valid: bool = Field(description="False when the call was invalid and fed back.")
    facts: dict[str, str] = Field(
        default_factory=dict, description="What the tool found, field by field."
    )
    must_say: str = Field("", description="What a reply must state from this result.")


class AgentState(BaseModel):
    ticket: str
    email: str | None = None
    team: str
    tools: list[str]
    steps: list[Step] = Field(default_factory=list)
    done: bool = False


class ToolCall(BaseModel):
    tool: str
    argument: str
    error: str = ""
    email: str = Field("", description="The ticket's customer (its `email`), '' if none.")


class ToolInput(BaseModel):
    argument: str
    error: str = ""
    email: str = Field("", description="The customer a look-up is made for.")


class Observation(BaseModel):
    output: str
    final: bool = False
    facts: dict[str, str] = Field(default_factory=dict)
    must_say: str = ""


class Proposal(BaseModel):
    """The action a ticket asks for, when the look-up found the customer's order."""

    action: Literal["refund", "cancel", "none"]
    text: str = Field(description="The ticket (the records server reads its order number).")
    email: str = Field("", description="The customer the action is made for.")
    summary: str = Field("", description="What the person deciding reads.")
    reason: str = Field("", max_length=500, description="Why, in the customer's words.")


class ActionOutcome(BaseModel):
    """What became of the action the ticket asked for."""

    action: Literal["refund", "cancel"]
    outcome: Literal["done", "refused", "handed_off"] = Field(
        description="done: approved and made; refused: approved, but a check of the shop's "
        "failed (`message`); handed_off: rejected by the person, or not decided in time."
    )
    message: str = ""
    by: str | None = Field(None, description="The key that decided (its name).")


class Acted(BaseModel):
    """The action step's output: what became of the action, None when none was asked."""

    outcome: ActionOutcome | None = None


class TriageResult(BaseModel):
    team: str
    label: str
    confidence: float
    reply: str = Field(description="The drafted reply to the customer.")
    drafted: Literal["llm", "facts", "handoff"] = Field(
        description=(
            "llm: the LLM's draft from the tool results, checked; facts: the tool results "
            "stated, because the draft missed them; handoff: no tool found anything, a "
            "look-up found nothing for this customer, or the ticket asks about an order or "
            "account without the customer's email."
        )
    )
    completed: bool = Field(
        description=(
            "The loop ended before its step limit: the model chose final_answer, or every "
            "tool that applies was used."
        )
    )
    steps: list[Step]
    action: ActionOutcome | None = Field(
        None,
        description="The refund or cancellation the ticket asked for, once a person "
        "decided (a run that proposes one answers 202 and waits: `servegraph.serving.runs`).",
    )


EXAMPLES = {
    "triage": {"text": "Where is my order 12345? It has not arrived.", "email": "ana@example.com"},
}
