"""A request's books while its graph runs: what each model-server call may spend of the
request's maximum cost, set aside before the call and settled by its actual charge
after, and the cost model each charge teaches (`servegraph.cost.budget`).

`_Run` (`servegraph.engine.runtime`) asks the ledger three things around each call:
`afford` (the request, its output tokens lowered to what is left, and the estimate set
aside; or `BudgetExceededError` before the call), `allowing` (the block in which the
call's allowance is set, for a server that can stop part-way) and `settle` (the call's
actual cost in place of its estimate). Parallel branches share one ledger, so they
share one budget.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Any

from pydantic import BaseModel

from servegraph.cost.budget import Budget, CostModel, allowing
from servegraph.cost.metering import charge_of
from servegraph.cost.prices import prices
from servegraph.errors import BudgetExceededError
from servegraph.lang.catalog import MethodContract


class Ledger:
    """One request's books: its `budget` (None: no maximum cost) against `costs`, the
    process's recent cost of each method."""

    def __init__(self, budget: Budget | None, costs: CostModel) -> None:
        self.budget = budget
        self.costs = costs

    async def afford(
        self,
        qualified: str,
        server: str,
        method: str,
        contract: MethodContract,
        args: dict[str, Any],
    ) -> tuple[BaseModel, float]:
        """The call's request, its output tokens lowered to what the budget has left,
        and the estimate set aside for it; raises `BudgetExceededError` when even the
        least of it (one token) would not fit."""
        request = contract.request.model_validate(args)
        budget = self.budget
        if budget is None:
            return request, 0.0
        estimate = self.costs.estimate(server, method)
        if estimate is None:  # never charged in this process: learn from its first call
            estimate = await self.costs.first_charge(server, method)
        if estimate is None:
            return request, 0.0  # the first call (or its failed): it runs
        left = budget.left_usd
        bound = contract.budget_field
        if bound is not None and estimate.per_token > 0:
            asked = int(getattr(request, bound))
            most = max(asked, 1)  # what is checked is that one token, at least, fits
            affordable = tokens_within(left - estimate.per_call, estimate.per_token, most)
            if affordable < 1:
                raise self._over(qualified, estimate.at(1), left)
            if affordable < asked:
                request = request.model_copy(update={bound: affordable})
                budget.capped[qualified] = {bound: affordable}
            reserved = estimate.at(min(asked, affordable))  # at most this many tokens
        else:
            reserved = estimate.at()
            if not reserved <= left:  # so a left that is not a number affords nothing
                raise self._over(qualified, reserved, left)
        budget.reserved_usd += reserved
        return request, reserved

    def allowing(self, reserved: float) -> AbstractContextManager[None]:
        """The block the call runs in: its allowance (`servegraph.cost.budget.allowance`)
        is what the budget has left, its own reservation included; no limit without a
        budget or with an infinite one (set, so a call never inherits an outer one)."""
        return allowing(None if self.budget is None else self.budget.left_usd + reserved)

    def settle(
        self,
        server: str,
        method: str,
        contract: MethodContract,
        reserved: float,
        response: Any,
    ) -> None:
        """A call ended: its actual cost replaces its estimate in the budget, and
        teaches the cost model. (A failed call's charge does not come back.)"""
        charge = charge_of(response) if response is not None else None
        usd = prices().usd(charge) if charge else 0.0
        if charge:
            tokens = usage_of(contract.usage, response)
            self.costs.observe(server, method, usd, tokens["output"] if tokens else None)
        self.costs.settled(server, method)
        if self.budget is not None:
            self.budget.reserved_usd -= reserved
            self.budget.spent_usd += usd

    def _over(self, qualified: str, estimate_usd: float, left_usd: float) -> BudgetExceededError:
        assert self.budget is not None
        budget = self.budget
        return BudgetExceededError(
            qualified, estimate_usd, left_usd, budget.max_usd, budget.spent_usd
        )


def usage_of(field: str | None, output: Any) -> dict[str, int] | None:
    """LLM token usage of a call's output, from the field its contract declares."""
    usage = getattr(output, field, None) if field else None
    if usage is not None:
        return {"input": int(usage.input_tokens), "output": int(usage.output_tokens)}
    return None


def tokens_within(usd: float, per_token: float, most: int) -> int:
    """How many tokens `usd` buys at `per_token` (> 0) each, 0 to `most`.

    Compared as floats, never turned into an int before it is known to be small: a
    caller's maximum may be far beyond anything a request spends (1e307 / 1e-9 is
    infinite in floats, and `int` of that raises), and a budget that is not a number
    buys nothing."""
    room = usd / per_token
    if room >= most:  # infinity included
        return most
    if not room >= 1:  # less than one token, negative, or NaN
        return 0
    return int(room)
