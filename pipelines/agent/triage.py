"""The support-triage agent graph.

    classify ─► route (switch on label: team + its tools) ─► work (loop ≤ 4):
        plan ─► choose (LLM, guided JSON: {tool, argument}) ─► parse ─► act (switch on tool:
        search_kb = embed ─► search | lookup_order | lookup_account | final_answer |
        default: the invalid call is fed back) ─► record
    ─► finish

Guided decoding makes every tool call valid JSON naming an allowed tool; the graph
narrows the choice further (the team's tools; no final answer before one look-up), since
a 135M model's *choice* is weak even when its syntax is guaranteed.
"""

from __future__ import annotations

import json
import re

from deployments.schemas import ChatResponse, SearchResponse
from pipelines.agent import tools
from pipelines.agent.models import (
    AgentState,
    Observation,
    Route,
    RouteInput,
    Step,
    Ticket,
    ToolCall,
    ToolInput,
    TriageResult,
)
from servegraph import Pipeline

MAX_STEPS = 4
TEAM_TOOLS = {
    "billing": ["lookup_order", "lookup_account", "search_kb"],
    "shipping": ["lookup_order", "search_kb"],
    "returns": ["lookup_order", "search_kb"],
    "account": ["lookup_account", "search_kb"],
    "security": ["lookup_account", "search_kb"],
    "technical": ["search_kb"],
    "product": ["search_kb"],
}
TOOL_HELP = {
    "lookup_order": "look up an order; argument: the order number, e.g. 12345",
    "lookup_account": "look up the customer's account; argument: their email address",
    "search_kb": "search the help articles; argument: a short search query",
    "final_answer": "finish; argument: the reply to send to the customer",
}


def build_pipeline() -> Pipeline:
    p = Pipeline(
        "triage",
        input=Ticket,
        output=TriageResult,
        description="Route a support ticket to a team and draft a reply with tools.",
        # Up to four LLM steps in a row: under load on CPU that passes the 60 s default.
        deadline_s=180,
        # One LLM call at a time per request, and the LLM takes 64 running + 64 queued.
        max_in_flight=128,
    )
    label = p.call("classify", "classifier", "classify", text=p.input.text)
    route = p.switch(
        "route",
        on=label.label,
        cases={team: team_case(team) for team in TEAM_TOOLS},
        default=team_case("general"),
        label=label.label,
        confidence=label.score,
    )
    work = p.loop(
        "work",
        agent_step(),
        until=is_done,
        max_iterations=MAX_STEPS,
        ticket=p.input.text,
        email=p.input.email,
        team=route.team,
        tools=route.tools,
    )
    p.returns(p.function("finish", finish, route=route, state=work))
    return p


def team_case(team: str) -> Pipeline:
    case = Pipeline(f"route_{team}", input=RouteInput, output=Route)
    case.returns(
        case.function(
            "assign", assign, label=case.input.label, confidence=case.input.confidence, team=team
        )
    )
    return case


def agent_step() -> Pipeline:
    step = Pipeline("agent_step", input=AgentState, output=AgentState)
    prompt = step.function("plan", plan, state=step.input)
    reply = step.call(
        "choose", "llm", "chat", messages=prompt.messages, json_schema=prompt.schema, max_tokens=120
    )
    call = step.function("parse", parse, reply=reply, state=step.input)
    observation = step.switch(
        "act",
        on=call.tool,
        cases={
            "search_kb": search_case(),
            "lookup_order": tool_case(order_tool),
            "lookup_account": tool_case(account_tool),
            "final_answer": tool_case(final_answer),
        },
        default=tool_case(invalid_call),
        argument=call.argument,
        error=call.error,
    )
    step.returns(
        step.function("record", record, state=step.input, call=call, observation=observation)
    )
    return step


def search_case() -> Pipeline:
    case = Pipeline("search_kb", input=ToolInput, output=Observation)
    query = case.call("embed", "embedder", "embed_one", text=case.input.argument)
    found = case.call(
        "search", "vector_index", "search", vector=query.vector, k=2, filter={"source": "kb"}
    )
    case.returns(case.function("summarise", summarise_hits, found=found))
    return case


def tool_case(fn) -> Pipeline:
    case = Pipeline(fn.__name__, input=ToolInput, output=Observation)
    case.returns(case.function("run", fn, argument=case.input.argument, error=case.input.error))
    return case


# -- node functions ----------------------------------------------------------------------


def assign(label: str, confidence: float, team: str) -> Route:
    return Route(
        team=team, label=label, confidence=confidence, tools=TEAM_TOOLS.get(team, ["search_kb"])
    )


def allowed_tools(state: AgentState) -> list[str]:
    """The tools offered at this step: the team's, narrowed by what the ticket holds.

    First step: if the ticket carries what a look-up tool needs (an order number, an
    email), only that look-up is offered; otherwise the team's tools, never a final
    answer before something was looked up. Later steps: the team's tools + final_answer.
    """
    if state.steps:
        return [*state.tools, "final_answer"]
    evidence = [tool for tool in state.tools if _has_evidence(tool, state)]
    return evidence[:1] or list(state.tools)


def _has_evidence(tool: str, state: AgentState) -> bool:
    if tool == "lookup_order":
        return re.search(r"\b\d{5}\b", state.ticket) is not None
    if tool == "lookup_account":
        return state.email is not None or "@" in state.ticket
    return False


def plan(state: AgentState) -> dict:
    allowed = allowed_tools(state)
    lines = [f"- {name}: {TOOL_HELP[name]}" for name in allowed]
    history = (
        "\n".join(
            f"Step {i}: {s.tool}({s.input}) -> {s.output}"
            for i, s in enumerate(state.steps, start=1)
        )
        or "(no steps yet)"
    )
    customer = f"Customer email: {state.email}\n" if state.email else ""
    system = (
        f"You are a support agent on the {state.team} team. Choose the next tool.\n"
        "Tools:\n"
        + "\n".join(lines)
        + "\nIf the ticket mentions an order number, call lookup_order first. "
        'Reply with JSON: {"tool": ..., "argument": ...}.'
    )
    user = f"Ticket: {state.ticket}\n{customer}Previous steps:\n{history}"
    schema = {
        "type": "object",
        "properties": {
            "tool": {"type": "string", "enum": allowed},
            "argument": {"type": "string", "maxLength": 300},
        },
        "required": ["tool", "argument"],
    }
    return {
        "messages": [{"role": "system", "content": system}, {"role": "user", "content": user}],
        "schema": schema,
    }


def parse(reply: ChatResponse, state: AgentState) -> ToolCall:
    """The LLM's tool call, or an 'invalid' call carrying the reason to feed back."""
    try:
        data = json.loads(reply.text)
        tool, argument = str(data["tool"]), str(data.get("argument", ""))
    except (ValueError, KeyError, TypeError) as exc:
        return ToolCall(
            tool="invalid",
            argument=reply.text[:200],
            error=f"not a valid tool call ({type(exc).__name__})",
        )
    if tool not in allowed_tools(state):
        return ToolCall(
            tool="invalid",
            argument=argument,
            error=f"unknown or unavailable tool {tool!r}; choose one of {allowed_tools(state)}",
        )
    return ToolCall(tool=tool, argument=argument)


def summarise_hits(found: SearchResponse) -> Observation:
    if not found.hits:
        return Observation(output="no matching help articles")
    return Observation(
        output=" | ".join(f"{h.metadata.get('title', h.id)}: {h.text[:300]}" for h in found.hits)
    )


def order_tool(argument: str, error: str = "") -> Observation:
    return Observation(output=tools.lookup_order(argument))


def account_tool(argument: str, error: str = "") -> Observation:
    return Observation(output=tools.lookup_account(argument))


def final_answer(argument: str, error: str = "") -> Observation:
    return Observation(output=argument, final=True)


def invalid_call(argument: str, error: str = "") -> Observation:
    return Observation(output=f"error: {error or 'invalid tool call'}")


def record(state: AgentState, call: ToolCall, observation: Observation) -> AgentState:
    step = Step(
        tool=call.tool,
        input=call.argument,
        output=observation.output,
        valid=call.tool != "invalid" and not observation.output.startswith("error"),
    )
    return state.model_copy(
        update={
            "steps": [*state.steps, step],
            "done": observation.final,
            "reply": observation.output if observation.final else state.reply,
        }
    )


def is_done(state: AgentState) -> bool:
    return state.done


def finish(route: Route, state: AgentState) -> TriageResult:
    reply = state.reply
    if not state.done:  # out of steps: hand the team what was found
        found = [s.output for s in state.steps if s.valid]
        reply = (
            ("Thanks for reaching out. Here is what we found: " + found[-1])
            if found
            else ("Thanks for reaching out; a member of our team will follow up shortly.")
        )
    return TriageResult(
        team=route.team,
        label=route.label,
        confidence=route.confidence,
        reply=reply,
        completed=state.done,
        steps=state.steps,
    )
