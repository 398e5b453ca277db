"""The support-triage agent graph.

    classify ─► route (switch on label: team + its tools) ─► work (loop ≤ 4):
        plan ─► choose (LLM, guided JSON: {tool, argument}) ─► parse ─► act (switch on tool:
        search_kb = embed ─► retrieve ─► split ─► embed_sentences ─► rank (the best article's
        closest sentences; `pipelines.rag.qa.retrieve_ranked`) |
        lookup_order | lookup_account (the support records server) | final_answer |
        default: the invalid call is fed back)
        ─► record
    ─► brief ─► draft (LLM, guided JSON: {reply}) ─► propose ─► act_on (switch on the
    action the ticket asks for: refund | cancel = an approval of records.refund_order |
    records.cancel_order, then its outcome; default: none) ─► finish

A 135M model's syntax is guaranteed by guided decoding; its *choices* are weak, so the
graph carries them:

- **No tool twice.** Each step offers only the team's tools not yet used (the schema's
  enum), so a repeat cannot be chosen, not merely be refused afterwards. The first step
  offers only the look-up the ticket holds the key for (an order number, an email).
- **The ticket's key wins.** A look-up uses the order number the ticket holds (the
  account look-up, the customer's email), whatever the model wrote; `search_kb` searches
  with the ticket's own words when the model's query shares fewer than two of them.
- **Only the customer's own records.** The look-ups are made for the request's `email`
  (the customer the calling application authenticated), never an address in the
  ticket's text, and the records server returns only that customer's records: another
  customer's order is "not found", and the reply says so and hands off. Without an
  `email` no look-up is offered; a ticket asking about an order or account is handed
  off with a request to write from the account's email address.
- **The loop ends when the evidence is in**: when the model chooses `final_answer`, or
  when every tool that applies has been used (so at most three steps of four).
- **The reply is drafted from the tool results**, by the LLM, in a separate step that
  sees only the ticket and the facts found (order status, account state, the sentences
  of the help article closest to the question). `finish` checks the draft: it must state
  what the look-ups found and invent no numbers; otherwise the reply is written from the
  facts themselves. `drafted` says which.
- **It acts only with a person's approval.** A ticket that asks for a refund or a
  cancellation ("refund", "money back", "cancel"), whose order the look-up found for
  this customer, proposes `records.refund_order` or `records.cancel_order` at an
  approval node: the request answers 202 with the run's id and waits for a key with
  `approve:triage` (`servegraph.serving.runs`); the person may change a refund's
  `amount` and `reason`. The reply then says what became of it: done, refused by the
  shop's checks and why, or handed off (rejected, or not decided within a day). A
  ticket that asks for no action runs as before.
"""

from __future__ import annotations

import re
from typing import TypedDict

from pydantic_core import from_json

from deployments.classifier import classifier
from deployments.embedder.contract import Embedding, EmbedResponse
from deployments.llm import llm
from deployments.llm.contract import ChatResponse
from deployments.records import records
from deployments.records.contract import EMAIL, ORDER_NUMBER, ActionResult, Lookup
from deployments.vector_index.contract import Hit
from pipelines import evidence
from pipelines.agent.models import (
    Acted,
    ActionOutcome,
    AgentState,
    Observation,
    Proposal,
    Route,
    RouteInput,
    Step,
    Ticket,
    ToolCall,
    ToolInput,
    TriageResult,
)
from pipelines.rag.qa import rank, retrieve_ranked
from servegraph import Decision, Method, Pipeline

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
    "final_answer": "stop looking: what was found is enough to reply; argument: empty",
}
DRAFT_SYSTEM = (
    "You are a friendly customer support agent. Write a short reply to the customer's "
    "ticket, using only the facts given. State the facts that answer the ticket. Do not "
    "invent anything."
)
# One worked example (made-up products, so it cannot leak an answer): a 135M model
# follows an example far better than an instruction.
DRAFT_EXAMPLE = [
    {
        "role": "user",
        "content": "Ticket: Where is my lamp? I ordered it last week, order 90001.\n\nFacts:\n"
        "- Order 90001 (Aria lamp) is shipped; carrier GLS, estimated delivery 2026-01-10, "
        "total $30.00.\n- Gift cards are valid for 12 months.",
    },
    {
        "role": "assistant",
        "content": '{"reply":"Your order 90001 (Aria lamp) has shipped with GLS and should '
        'arrive by 2026-01-10."}',
    },
]
DRAFT_CHARS = 400
# An article is used when its sentence closest to the query is at least this similar.
ARTICLE_BAR = 0.35
HANDOFF = "Thanks for reaching out; we have passed your ticket to our {team} team."
NOT_FOUND = (
    "Thanks for reaching out. We could not find {what} for the email address you wrote "
    "from; we have passed your ticket to our {team} team."
)
ASK_FOR_EMAIL = (
    "Thanks for reaching out. To look up an order or an account, please write to us from "
    "the email address of your account; we have passed your ticket to our {team} team."
)
LOOKUPS = ("lookup_order", "lookup_account")
# What a ticket says when it asks for an action ("cancelled", a state, does not ask).
ASKS = {
    "refund": re.compile(r"\b(refund|money back|reimburse)\b", re.IGNORECASE),
    "cancel": re.compile(r"\bcancel(lation)?\b", re.IGNORECASE),
}
APPROVAL_EXPIRES_S = 24 * 3600.0
ACTED = {
    "done": "Done: {message}.",
    "refused": "Sorry, we could not do it: {message}.",
    "handed_off": "A member of our {team} team will look at your {action} request and "
    "write to you.",
}


def build_pipeline() -> Pipeline:
    p = Pipeline(
        "triage",
        input=Ticket,
        output=TriageResult,
        description="Route a support ticket to a team and draft a reply with tools.",
        # Up to four LLM steps and a draft in a row: under load on CPU that passes 60 s.
        deadline_s=180,
        # One LLM call at a time per request, and the LLM takes 64 running + 64 queued.
        max_in_flight=128,
        signals=triage_signals,
    )
    label = p.call("classify", classifier.classify(text=p.input.text))
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
    brief = p.function("brief", brief_writer, state=work)
    draft = p.call(
        "draft", llm.chat(messages=brief.messages, json_schema=brief.schema, max_tokens=160)
    )
    proposal = p.function("propose", propose, state=work)
    acted = p.switch(
        "act_on",
        on=proposal.action,
        cases={"refund": action_case("refund"), "cancel": action_case("cancel")},
        default=no_action_case(),
        action=proposal.action,
        text=proposal.text,
        email=proposal.email,
        summary=proposal.summary,
        reason=proposal.reason,
    )
    p.returns(p.function("finish", finish, route=route, state=work, draft=draft, acted=acted))
    return p


def action_case(action: str) -> Pipeline:
    """A person decides on the action; it is made once, under the run's key."""
    case = Pipeline(f"ask_{action}", input=Proposal, output=Acted)
    method = records.refund_order if action == "refund" else records.cancel_order
    decision = case.approval(
        "approve",
        method(text=case.input.text, email=case.input.email, reason=case.input.reason),
        summary=case.input.summary,
        expires_s=APPROVAL_EXPIRES_S,
        # A partial refund; never the order or the customer.
        editable=["amount", "reason"] if action == "refund" else ["reason"],
    )
    case.returns(case.function("outcome", outcome_of, decision=decision, action=action))
    return case


def no_action_case() -> Pipeline:
    case = Pipeline("no_action", input=Proposal, output=Acted)
    case.returns(case.function("nothing", nothing, proposal=case.input))
    return case


def nothing(proposal: Proposal) -> Acted:
    return Acted()


def propose(state: AgentState) -> Proposal:
    """The action the ticket asks for, if the order look-up found the order the ticket
    names for this customer (a refund is asked before a cancellation when a ticket
    says both)."""
    named = set(ORDER_NUMBER.findall(state.ticket))  # an order the ticket itself names
    order = next(
        (
            s
            for s in state.steps
            if s.valid and s.tool == "lookup_order" and s.facts.get("id") in named
        ),
        None,
    )
    asked = next((action for action, words in ASKS.items() if words.search(state.ticket)), None)
    if order is None or asked is None or not state.email or len(named) != 1:
        # Nothing asked, no order found, no customer, or several orders named: which one
        # is meant is a person's call, not the agent's (the ticket is handed off as is).
        return Proposal(action="none", text=state.ticket)
    f = order.facts
    summary = (
        f"{asked.capitalize()} of order {f['id']} ({f['product']}, {f['total']}, "
        f"{f['status']}) asked by {state.email}. Ticket: {state.ticket}"
    )
    return Proposal(
        action=asked,
        text=f"order {f['id']}: {state.ticket}",
        email=state.email,
        summary=summary,
        reason=state.ticket[:500],
    )


def outcome_of(decision: Decision, action: str) -> Acted:
    if decision.decision == "approved" and decision.result is not None:
        done = ActionResult.model_validate(decision.result)
        outcome = "done" if done.outcome == "done" else "refused"
        return Acted(
            outcome=ActionOutcome(
                action=action,
                outcome=outcome,
                message=done.message,
                by=decision.by,
            )
        )
    return Acted(
        outcome=ActionOutcome(
            action=action,
            outcome="handed_off",
            message=decision.reason or decision.decision,
            by=decision.by,
        )
    )


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
        "choose", llm.chat(messages=prompt.messages, json_schema=prompt.schema, max_tokens=60)
    )
    call = step.function("parse", parse, reply=reply, state=step.input)
    observation = step.switch(
        "act",
        on=call.tool,
        cases={
            "search_kb": search_case(),
            "lookup_order": lookup_case(records.lookup_order, order_observation),
            "lookup_account": lookup_case(records.lookup_account, account_observation),
            "final_answer": tool_case(final_answer),
        },
        default=tool_case(invalid_call),
        argument=call.argument,
        error=call.error,
        email=call.email,
    )
    step.returns(
        step.function("record", record, state=step.input, call=call, observation=observation)
    )
    return step


def search_case() -> Pipeline:
    """The help articles' passages closest to the query, re-ranked by their sentences
    (the RAG pipeline's `rank`), summed up as the best article's best sentences."""
    case = Pipeline("search_kb", input=ToolInput, output=Observation)
    question = case.input.argument
    case.returns(retrieve_ranked(case, question, k=3, filter={"source": "kb"}, ranker=rank_hits))
    return case


def lookup_case(method: Method[..., Lookup], observe) -> Pipeline:
    """A look-up in the support records server, with the key the argument holds, for
    the ticket's customer (the server answers only with their records)."""
    case = Pipeline(method.name, input=ToolInput, output=Observation)
    found = case.call("find", method(text=case.input.argument, email=case.input.email))
    case.returns(case.function("observe", observe, found=found))
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


def remaining_tools(state: AgentState) -> list[str]:
    """The team's tools that apply to this ticket and were not used yet: a look-up
    applies when the ticket holds its key; search_kb always does."""
    used = {s.tool for s in state.steps if s.valid}
    return [t for t in state.tools if t not in used and (t == "search_kb" or key_of(t, state))]


def key_of(tool: str, state: AgentState) -> str:
    """The key of a look-up tool, or '': the order number the ticket holds, or the
    customer's email. Both only for a ticket with the customer's email (the request's,
    never one in its text): without it nothing is looked up."""
    if not state.email:
        return ""
    if tool == "lookup_order":
        found = ORDER_NUMBER.search(state.ticket)
        return found.group(0) if found else ""
    if tool == "lookup_account":
        return state.email
    return ""


def allowed_tools(state: AgentState) -> list[str]:
    """The tools offered at this step. First step: the look-up the ticket holds the key
    for, if any, else what remains (never a final answer before a look-up). Later
    steps: what remains, and final_answer."""
    remaining = remaining_tools(state)
    if not any(s.valid for s in state.steps):
        keyed = [t for t in remaining if t != "search_kb"]
        return keyed[:1] or remaining
    return [*remaining, "final_answer"]


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
            "argument": {"type": "string", "maxLength": 80},
        },
        "required": ["tool", "argument"],
    }
    return {
        "messages": [{"role": "system", "content": system}, {"role": "user", "content": user}],
        "schema": schema,
    }


def parse(reply: ChatResponse, state: AgentState) -> ToolCall:
    """The LLM's tool call with the argument the ticket dictates, or an 'invalid' call
    carrying the reason to feed back."""
    try:  # a reply cut off inside its argument still names its tool
        data = from_json(reply.text, allow_partial="trailing-strings")
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
            error=f"unknown, used or unavailable tool {tool!r}; choose one of "
            f"{allowed_tools(state)}",
        )
    if key := key_of(tool, state):
        argument = key
    elif tool == "search_kb" and is_poor_query(argument, state.ticket):
        argument = state.ticket
    return ToolCall(tool=tool, argument=argument, email=state.email or "")


def is_poor_query(query: str, ticket: str) -> bool:
    """A query with fewer than two of the ticket's words (numbers aside): the model
    wandered off, or wrote an order number where words were needed."""
    shared = evidence.content_words(query) & evidence.content_words(ticket)
    return sum(not w.isdigit() for w in shared) < 2


def rank_hits(
    question: str, query: Embedding, hits: list[Hit], split: dict, embedded: EmbedResponse
) -> Observation:
    ranked = rank(question, query, hits, split, embedded)
    if not ranked.sentences or ranked.sentences[0].score < ARTICLE_BAR:
        return Observation(output="no matching help articles")
    top = ranked.sentences[0]
    title = next(p.title for p in ranked.passages if p.n == top.n)
    close = [s.text for s in ranked.sentences if s.n == top.n and s.score >= top.score - 0.1]
    text = " ".join(close[:2])
    return Observation(
        output=f"{title}: {text}", facts={"article": title, "text": text, "top": top.text}
    )


def order_observation(found: Lookup) -> Observation:
    order = found.record
    return Observation(
        output=found.message, facts=order or {}, must_say=order["status"] if order else ""
    )


def account_observation(found: Lookup) -> Observation:
    account = found.record
    return Observation(
        output=found.message,
        facts=account or {},
        # "locked (too many login attempts)" is stated as "locked"
        must_say=account["status"].split(" (")[0] if account else "",
    )


def final_answer(argument: str, error: str = "") -> Observation:
    return Observation(output="enough evidence to reply", final=True)


def invalid_call(argument: str, error: str = "") -> Observation:
    return Observation(output=f"error: {error or 'invalid tool call'}")


def record(state: AgentState, call: ToolCall, observation: Observation) -> AgentState:
    step = Step(
        tool=call.tool,
        input=call.argument,
        output=observation.output,
        valid=call.tool != "invalid" and not observation.output.startswith("error"),
        facts=observation.facts,
        must_say=observation.must_say,
    )
    state = state.model_copy(update={"steps": [*state.steps, step]})
    return state.model_copy(update={"done": observation.final or not remaining_tools(state)})


def is_done(state: AgentState) -> bool:
    return state.done


def found(state: AgentState) -> list[Step]:
    """The steps that found something to tell the customer."""
    return [s for s in state.steps if s.valid and s.facts]


def brief_writer(state: AgentState) -> dict:
    """The draft's prompt: an example, then the ticket and the facts found."""
    facts = "\n".join(f"- {line}" for line in fact_lines(found(state)))
    return {
        "messages": [
            {"role": "system", "content": DRAFT_SYSTEM},
            *DRAFT_EXAMPLE,
            {"role": "user", "content": f"Ticket: {state.ticket}\n\nFacts:\n{facts}"},
        ],
        "schema": {
            "type": "object",
            "properties": {"reply": {"type": "string", "maxLength": DRAFT_CHARS}},
            "required": ["reply"],
        },
    }


def not_found(state: AgentState) -> list[str]:
    """What the look-ups did not find for this customer ('order 10234', 'an account'):
    a record of another customer's is not found either."""
    missing = [s for s in state.steps if s.valid and s.tool in LOOKUPS and not s.facts]
    return [f"order {s.input}" if s.tool == "lookup_order" else "an account" for s in missing]


def asks_without_email(state: AgentState) -> bool:
    """The ticket holds an order number or an email address one of the team's look-ups
    would take, but came without the customer's email, so nothing was looked up."""
    if state.email:
        return False
    order = "lookup_order" in state.tools and ORDER_NUMBER.search(state.ticket)
    account = "lookup_account" in state.tools and EMAIL.search(state.ticket)
    return bool(order or account)


def finish(route: Route, state: AgentState, draft: ChatResponse, acted: Acted) -> TriageResult:
    steps = found(state)
    reply, drafted = checked_draft(draft, state, steps), "llm"
    if missing := not_found(state):
        what = " or ".join(missing)
        reply, drafted = NOT_FOUND.format(what=what, team=route.team), "handoff"
    elif asks_without_email(state):
        reply, drafted = ASK_FOR_EMAIL.format(team=route.team), "handoff"
    elif not steps:
        reply, drafted = HANDOFF.format(team=route.team), "handoff"
    elif not reply:
        reply, drafted = from_facts(steps), "facts"
    if (done := acted.outcome) is not None:  # what became of the action comes last
        said = ACTED[done.outcome].format(message=done.message, action=done.action, team=route.team)
        reply = f"{reply} {said}"
    return TriageResult(
        team=route.team,
        label=route.label,
        confidence=route.confidence,
        reply=reply,
        drafted=drafted,
        completed=state.done,
        steps=state.steps,
        action=acted.outcome,
    )


def checked_draft(draft: ChatResponse, state: AgentState, steps: list[Step]) -> str:
    """The LLM's draft cut down to its sentences the facts support (see
    `evidence.supported_sentences`), if those state what the look-ups found (or, with
    no look-up, the gist of the article's sentence closest to the ticket); else ''."""
    try:
        text = str(from_json(draft.text, allow_partial="trailing-strings").get("reply", ""))
    except (ValueError, AttributeError):
        return ""
    facts = " ".join([state.ticket, *(s.output for s in steps)])
    kept = " ".join(evidence.supported_sentences(text, state.ticket, facts, 0.6, 3))
    musts = [s.must_say for s in steps if s.must_say]
    if not kept or any(must.lower() not in kept.lower() for must in musts):
        return ""
    articles = [s.facts["top"] for s in steps if "top" in s.facts]
    if not musts and not all(evidence.covers(kept, top) for top in articles):
        return ""
    return kept


def fact_lines(steps: list[Step]) -> list[str]:
    """What the tools found, as sentences: for the draft's prompt (a small model copies
    sentences far better than it turns records into prose), and the fallback reply."""
    lines = []
    for step in steps:
        f = step.facts
        if step.tool == "lookup_order":
            lines.append(
                f"Order {f['id']} ({f['product']}) is {f['status']}; carrier {f['carrier']}, "
                f"estimated delivery {f['eta']}, total {f['total']}."
            )
        elif step.tool == "lookup_account":
            lines.append(
                f"The account of {f['name']} ({f['plan']}) is {f['status']}; "
                f"customer since {f['since']}."
            )
        else:
            lines.append(f["text"])
    return lines


def from_facts(steps: list[Step]) -> str:
    """A reply stating the facts found, for when the LLM's draft did not."""
    return " ".join(["Thanks for contacting us.", *fact_lines(steps)])


class TriageSignals(TypedDict):
    tools: float
    handoff: float
    draft_kept: float
    completed: float


def triage_signals(result: TriageResult) -> TriageSignals:
    """What a triage answer says about its quality without a label, compared across
    versions (issue 28): the tools it used, whether it handed the ticket off, whether
    the LLM's draft was kept (else the tool results were stated), whether the loop
    ended before its step limit."""
    return {
        "tools": float(sum(step.valid for step in result.steps)),
        "handoff": float(result.drafted == "handoff"),
        "draft_kept": float(result.drafted == "llm"),
        "completed": float(result.completed),
    }
