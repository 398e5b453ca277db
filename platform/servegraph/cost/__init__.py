"""What each request costs: the resources a replica spent on it, in resource-seconds,
then in money (a price table) and energy (a power table).

A model-server replica holds its resources (its CPUs, its GPU share, its memory) the
whole time it serves; `Meter` shares that time among the requests it serves at once, by
processor sharing: while n requests are in flight, each is charged dt / n of the
replica. The charges of a window add up to the replica's busy time, exactly.

Between two calls the replica's process still works for them: Serve receives,
deserialises and dispatches each request outside the method the meter wraps (a
millisecond or two here, as much as a vector search itself). A gap shorter than
`OVERHEAD_GAP_S` with nothing in flight is that work, and is charged to the request
that starts after it; a longer gap is idle time.

- A batch of the encoders' is charged alike to every request in it, however many
  items each brought: each held the replica for the batch.
- The LLM: vLLM's continuous batching runs one decode step for every sequence in
  flight, so an equal share per request per moment is a split by tokens processed:
  a request generating 200 tokens stays in flight four times as long as one generating
  50, and is charged about four times as much. (Its prompt's prefill is shared alike,
  the one part not split by its own tokens.)

Idle time (nothing in flight) is charged to nobody: the unit economics of a request
are what serving it took, and the idle share is the fleet's utilisation, which Ray's
own metrics show.

The charge travels back with the response (`attach` / `charge_of`, a side channel that
survives Ray's serialisation and stays out of the response's JSON), the pipeline
runtime records it on the node (`NodeRecord.charge`), and the ingress prices it
(`Prices`) into `x-servegraph-usage`, the stream's `usage` event, batch rows and the
metrics.

A caller may cap a request's cost (`Budget`). A call's cost is known only once it has
run, so the runtime stops before a call whose *estimate* does not fit what is left: the
mean of the method's recent charges (`CostModel`), learned by the runtime from every
request's calls, under the load of the moment. For the LLM the estimate is a line,
per call plus per output token, and the call's `max_tokens` is lowered to what is left
buys. The first call of a method in a process has no estimate: it runs, and calls with
a budget that come while it does wait for its charge (`CostModel.first_charge`).

An estimate cannot bound a cost that depends on who else is served at the same moment
(a decode step shared by two sequences costs each of them four times what it does
shared by eight), so the call also carries what is left (`allowance()`), and a server
that can stop part-way stops there: the LLM ends its generation when its charge
reaches it (`deployments/llm/engine.py`), as if at max_tokens. A call that cannot stop
part-way (an encoder's batch) can pass it by how far its cost differs from its
estimate; the usage reports what the request actually cost.

The family: `metering` (what a replica spent on each request, in resource-seconds),
`prices` (the price and power tables), `budget` (a request's maximum cost, the
estimates it is checked against, a call's allowance) and `report` (cost per 1,000
requests from Prometheus, for `servegraph cost`). Imports Ray only inside functions.
"""
