"""The triage agent's wiring, in-process with scripted model servers (no Ray): the loop
refuses repeats, uses the ticket's keys, ends when the evidence is in, and drafts the
reply from the tool results (or states them when the draft misses them)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from deployments.catalog import CATALOG
from deployments.classifier.contract import Classification
from deployments.embedder.contract import Embedding, EmbedResponse
from deployments.llm.contract import ChatResponse, Usage
from deployments.vector_index.contract import Hit, SearchResponse
from pipelines.agent.triage import build_pipeline
from servegraph import InProcessRuntime, validate


class ScriptedLLM:
    def __init__(self, replies: list[str]) -> None:
        self.replies = list(replies)
        self.requests = []

    async def chat(self, request):
        self.requests.append(request)
        return ChatResponse(
            text=self.replies.pop(0),
            finish_reason="stop",
            usage=Usage(input_tokens=10, output_tokens=5),
            model="scripted",
        )


class FixedClassifier:
    def __init__(self, label: str) -> None:
        self.label = label

    async def classify(self, request):
        return Classification(label=self.label, score=0.9, scores={self.label: 0.9})


ARTICLE = (
    "If a device will not connect to wifi, hold the power button for 10 seconds to reset "
    "its network settings. Devices only support 2.4 GHz networks."
)


class OneArticle:
    """Embedder and index in one: every text embeds to the same vector, so every
    sentence of the one article is equally close; records what was searched."""

    def __init__(self) -> None:
        self.embedded: list[str] = []

    async def embed_one(self, request):
        self.embedded.append(request.text)
        return Embedding(vector=np.ones(4, dtype=np.float32) / 2, dim=4)

    async def embed(self, request):
        return EmbedResponse(
            vectors=np.full((len(request.texts), 4), 0.5, dtype=np.float32), dim=4, model="f"
        )

    async def search(self, request):
        hit = Hit(id="kb/wifi#0", text=ARTICLE, score=0.9, metadata={"title": "Wifi"})
        return SearchResponse(hits=[hit])


def call(tool: str, argument: str = "") -> str:
    return json.dumps({"tool": tool, "argument": argument})


def draft(text: str) -> str:
    return json.dumps({"reply": text})


@pytest.fixture(autouse=True)
def _agent_db(tmp_path, monkeypatch):
    monkeypatch.setenv("SERVEGRAPH_HOME", str(tmp_path))  # the real records, built here


def runtime(label: str, llm: ScriptedLLM) -> InProcessRuntime:
    from deployments.records.model import SupportRecords

    class Records(SupportRecords):
        """The real records, remembering every look-up asked of them."""

        def __init__(self) -> None:
            super().__init__()
            self.asked: list[tuple[str, str, str]] = []

        async def lookup_order(self, request):
            self.asked.append(("lookup_order", request.text, getattr(request, "email", None)))
            return await super().lookup_order(request)

        async def lookup_account(self, request):
            self.asked.append(("lookup_account", request.text, getattr(request, "email", None)))
            return await super().lookup_account(request)

    kb = OneArticle()
    servers = {
        "classifier": FixedClassifier(label),
        "llm": llm,
        "embedder": kb,
        "vector_index": kb,
        "records": Records(),
    }
    return InProcessRuntime(CATALOG, servers)


def test_agent_graph_is_valid() -> None:
    validate(build_pipeline().build(), CATALOG)


async def test_invalid_call_is_fed_back_then_the_tickets_order_then_a_checked_draft() -> None:
    llm = ScriptedLLM(
        [
            "{not json",
            call("lookup_order", "99999"),  # the ticket holds 12345: that is what is looked up
            call("final_answer"),
            draft("Your Nimbus headphones are in transit with DHL. Thank you!"),
        ]
    )
    result = await runtime("shipping", llm).run(
        build_pipeline().build(), {"text": "Where is my order 12345?", "email": "ANA@example.com"}
    )
    assert result.team == "shipping" and result.completed
    assert [s.tool for s in result.steps] == ["invalid", "lookup_order", "final_answer"]
    assert not result.steps[0].valid and "not a valid tool call" in result.steps[0].output
    assert result.steps[1].input == "12345" and "in transit" in result.steps[1].output
    assert result.drafted == "llm"
    assert result.reply == "Your Nimbus headphones are in transit with DHL."  # no filler
    # The invalid call was shown to the model on the next step; step one offered only
    # the look-up the ticket holds the key for.
    assert "not a valid tool call" in llm.requests[1].messages[1].content
    assert llm.requests[0].json_schema["properties"]["tool"]["enum"] == ["lookup_order"]
    # The draft saw the ticket and the order's facts as a sentence.
    assert "Order 12345 (Nimbus headphones) is in transit" in llm.requests[-1].messages[-1].content


async def test_a_used_tool_is_not_offered_again_and_a_repeat_is_refused() -> None:
    llm = ScriptedLLM([call("lookup_order", "12345")] * 4 + [draft("")])
    result = await runtime("shipping", llm).run(
        build_pipeline().build(),
        {"text": "Order 12345 has not arrived", "email": "ana@example.com"},
    )
    assert [s.tool for s in result.steps] == ["lookup_order", "invalid", "invalid", "invalid"]
    assert "used or unavailable tool 'lookup_order'" in result.steps[1].output
    assert llm.requests[1].json_schema["properties"]["tool"]["enum"] == [
        "search_kb",
        "final_answer",
    ]
    assert not result.completed  # out of steps
    # The empty draft is replaced by the facts found.
    assert result.drafted == "facts" and "in transit" in result.reply


async def test_the_loop_ends_when_every_tool_that_applies_was_used() -> None:
    """No order number, no email: only search_kb applies, once; a poor query (no word of
    the ticket) is replaced by the ticket's own words."""
    ticket = "My watch will not connect to the wifi at home"
    llm = ScriptedLLM([call("search_kb", "xyz"), draft("I cannot help.")])
    rt = runtime("technical", llm)
    result = await rt.run(build_pipeline().build(), {"text": ticket})
    assert result.completed and [s.tool for s in result.steps] == ["search_kb"]
    assert result.steps[0].input == ticket
    assert rt.servers["embedder"].embedded == [ticket]
    assert len(llm.requests) == 2  # one choice, one draft
    # "I cannot help." states nothing the article says: the reply states the article.
    assert result.drafted == "facts"
    assert "10 seconds" in result.reply and "2.4 GHz" in result.reply


async def test_a_draft_that_invents_a_number_is_cut_to_what_the_facts_support() -> None:
    llm = ScriptedLLM(
        [
            call("search_kb", "wifi connect"),
            draft(
                "Hold the power button for 10 seconds to reset the network settings. "
                "Devices only support 2.4 GHz networks. Call us at 555-0100."
            ),
        ]
    )
    result = await runtime("technical", llm).run(
        build_pipeline().build(), {"text": "My watch will not connect to wifi"}
    )
    assert result.drafted == "llm"
    assert "10 seconds" in result.reply and "555" not in result.reply


# -- only the customer's own records (issue 24) -------------------------------------------
# The seed: 10234 is sam@example.com's Summit standing desk (delivered, $240.00); lee's
# account is Lee Park's Basic plan, locked; ana@example.com owns 12345 and 14550.
OTHERS = ("Summit", "240.00", "sam@example.com", "Lee Park", "Basic plan")


def disclosed(result, llm: ScriptedLLM) -> list[str]:
    """Another customer's facts anywhere in the answer or in what the LLM was shown."""
    seen = result.model_dump_json() + "".join(m.content for r in llm.requests for m in r.messages)
    return [fact for fact in OTHERS if fact in seen]


async def test_an_order_of_another_customer_is_not_found_for_this_one() -> None:
    llm = ScriptedLLM(
        [
            call("lookup_order", "10234"),
            call("final_answer"),
            draft("Your Summit standing desk was delivered on 2026-11-18."),
        ]
    )
    rt = runtime("shipping", llm)
    result = await rt.run(
        build_pipeline().build(),
        {"text": "Where is order 10234? It has not arrived.", "email": "ana@example.com"},
    )
    # Looked up for ana, the ticket's customer; the server found nothing of hers.
    assert rt.servers["records"].asked == [("lookup_order", "10234", "ana@example.com")]
    order = result.steps[0]
    assert order.tool == "lookup_order" and order.valid and order.facts == {}
    assert order.output == "no order 10234 found for this customer"
    assert order.must_say == ""
    # The reply says the order was not found for her and hands off, whatever the draft.
    assert result.drafted == "handoff"
    assert "could not find order 10234" in result.reply and "shipping team" in result.reply
    assert disclosed(result, llm) == []


async def test_an_account_is_looked_up_for_the_tickets_email_never_one_in_its_text() -> None:
    llm = ScriptedLLM([call("lookup_account", "lee@example.com"), call("final_answer"), draft("")])
    rt = runtime("account", llm)
    result = await rt.run(
        build_pipeline().build(),
        {"text": "Is the account lee@example.com locked?", "email": "ana@example.com"},
    )
    asked = rt.servers["records"].asked
    assert asked == [("lookup_account", "ana@example.com", "ana@example.com")]
    assert result.steps[0].facts["name"] == "Ana Lima"  # her own account
    assert disclosed(result, llm) == []


@pytest.mark.parametrize(
    ("team", "text"),
    [
        ("shipping", "Where is order 10234?"),
        ("account", "Please tell me the state of the account lee@example.com."),
        ("billing", "What did order 10234 of lee@example.com cost?"),
    ],
)
async def test_a_ticket_without_an_email_gets_no_order_or_account_facts(
    team: str, text: str
) -> None:
    # The model asks for a look-up anyway; none is offered, so it is refused.
    llm = ScriptedLLM(
        [call("lookup_order", "10234"), call("lookup_account", "lee@example.com")]
        + [call("search_kb", text)] * 2
        + [draft("Your Summit standing desk was delivered. Lee Park's Basic plan is locked.")]
    )
    rt = runtime(team, llm)
    result = await rt.run(build_pipeline().build(), {"text": text})
    assert rt.servers["records"].asked == []
    for request in llm.requests[:-1]:
        offered = request.json_schema["properties"]["tool"]["enum"]
        assert not {"lookup_order", "lookup_account"} & set(offered), offered
    assert not any(s.valid and s.tool in ("lookup_order", "lookup_account") for s in result.steps)
    assert all(set(s.facts) <= {"article", "text", "top"} for s in result.steps)
    # Handed off, asking the customer to write from their account's email address.
    assert result.drafted == "handoff"
    assert "email address of your account" in result.reply and f"{team} team" in result.reply
    assert disclosed(result, llm) == []


async def test_without_an_email_or_a_key_in_the_ticket_the_articles_answer() -> None:
    """Nothing to look up: the help articles answer, as before."""
    llm = ScriptedLLM([call("search_kb", "wifi connect"), draft("")])
    result = await runtime("account", llm).run(
        build_pipeline().build(), {"text": "My watch will not connect to wifi"}
    )
    assert [s.tool for s in result.steps] == ["search_kb"]
    assert result.drafted == "facts" and "2.4 GHz" in result.reply


async def test_a_ticket_asking_for_a_refund_of_its_order_waits_for_approval_then_acts_once() -> (
    None
):
    """The look-up found the customer's order and the ticket asks for a refund: the run
    stops at the approval with what the person reads; approved, the refund is made and
    the reply says so; the nodes before the stop (the LLM's too) are not run again."""
    from servegraph import MemoryCheckpoints, RunWaiting, Verdict

    ticket = {"text": "Please refund order 14550, it never came.", "email": "ana@example.com"}
    llm = ScriptedLLM([call("lookup_order", "14550"), call("final_answer"), draft("")])
    rt = runtime("billing", llm)
    graph, checkpoints = build_pipeline().build(), MemoryCheckpoints()
    with pytest.raises(RunWaiting) as stop:
        await rt.execute(graph, ticket, run_id="t1", checkpoints=checkpoints)
    pending = stop.value.pending
    assert (pending.node, pending.method) == ("act_on/case[refund]/approve", "refund_order")
    assert pending.summary.startswith(
        "Refund of order 14550 (Terra backpack, $49.00, delayed in customs) asked by ana@"
    )
    assert pending.arguments["text"].startswith("order 14550:")
    assert pending.editable == ["amount", "reason"]

    decided = {pending.node: Verdict("approve", by="support-lead")}
    result = await rt.execute(
        graph, ticket, run_id="t1", checkpoints=checkpoints, decisions=decided
    )
    acted = result.output.action
    assert (acted.action, acted.outcome, acted.by) == ("refund", "done", "support-lead")
    assert result.output.reply.endswith("Done: order 14550 refunded $49.00.")
    assert llm.replies == [] and len(llm.requests) == 3  # nothing asked again
    assert [a for a in rt.servers["records"].asked if a[0] == "lookup_order"] == [
        ("lookup_order", "14550", "ana@example.com")
    ]


@pytest.mark.parametrize(
    ("ticket", "decision", "said"),
    [
        (
            "Cancel my order 12345 please.",
            "approve",
            "Sorry, we could not do it: order 12345 cannot be cancelled: it is in transit.",
        ),
        (
            "I want my money back for order 12345.",
            "reject",
            "A member of our billing team will look at your refund request",
        ),
    ],
    ids=["cancel refused by the shop", "refund rejected"],
)
async def test_the_reply_says_what_became_of_the_action(ticket, decision, said) -> None:
    from servegraph import MemoryCheckpoints, RunWaiting, Verdict

    request = {"text": ticket, "email": "ana@example.com"}
    replies = [call("lookup_order", "12345"), call("final_answer"), draft("")]
    rt = runtime("billing", ScriptedLLM(replies))
    graph, checkpoints = build_pipeline().build(), MemoryCheckpoints()
    with pytest.raises(RunWaiting) as stop:
        await rt.execute(graph, request, run_id="t2", checkpoints=checkpoints)
    decided = {stop.value.pending.node: Verdict(decision, by="lead", reason="not this time")}
    result = await rt.execute(
        graph, request, run_id="t2", checkpoints=checkpoints, decisions=decided
    )
    assert said in result.output.reply, result.output.reply


@pytest.mark.parametrize(
    ("ticket", "email"),
    [
        ("I think I paid twice for order 14550, can you check?", "ana@example.com"),
        ("Please refund order 10234.", "ana@example.com"),  # another customer's order
        ("Please refund order 14550.", None),  # no customer to act for
        ("My subscription was cancelled, why?", "kim@example.com"),  # a state, not a request
        ("I was charged twice, please refund one payment.", "ana@example.com"),  # no order
        ("Is order 14550 refundable?", "ana@example.com"),  # a question, not a request
        ("Refund 14550 or 12345, whichever shipped.", "ana@example.com"),  # which one?
    ],
)
async def test_no_action_is_proposed_without_a_request_and_the_customers_order(
    ticket, email
) -> None:
    replies = [call("lookup_order", "14550"), call("final_answer"), draft("")] * 2
    result = await runtime("billing", ScriptedLLM(replies)).run(
        build_pipeline().build(), {"text": ticket, "email": email}
    )
    assert result.action is None
