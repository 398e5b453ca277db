"""Which version of a pipeline answers a request (issue 28): weights between the
versions served, sticky per caller, a shadow share, and a pin by header.

Arithmetic and a table only; no Ray, no clock. The ingress asks `route` for each
request; the table of splits lives in one cluster actor (`Board`, shared by every
ingress replica, kept in a file so a restart keeps it).

Stickiness: a caller (its key's name, or the session header it sends) is hashed with
the pipeline's name to a point in [0, 1), and the versions share that interval in
natural order (v1 first), each as wide as its weight. So a caller stays on one version
while the weights stand, and when a candidate's weight grows, the callers it had keep
it: its interval only widens (v2 at 10 % holds [0.9, 1); at 25 %, [0.75, 1)).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import random
import time
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from servegraph._files import write_atomically
from servegraph.lang.discovery import default_version, version_order

logger = logging.getLogger("ray.serve")

BOARD_ACTOR = "servegraph-traffic"
REFRESH_S = 0.5  # how often an ingress replica asks the board for a newer table
VERSION_HEADER = "x-pipeline-version"  # pins a request's version; names the one that answered
SESSION_HEADER = "x-session-id"  # what a request sticks by when sent (else its key's name)


class TrafficSplit(BaseModel):
    """How one pipeline's requests are shared among its versions."""

    model_config = ConfigDict(extra="forbid")

    weights: dict[str, int] = Field(
        description="Version -> percent of requests it answers; whole percents summing "
        "to 100. A version served but not named here answers none (unless pinned)."
    )
    shadow: str | None = Field(
        None,
        description="A version that also runs a share of the requests (`shadow_percent`): "
        "its answer is recorded and compared, never returned, and the caller never waits "
        "for it.",
    )
    shadow_percent: float = Field(0.0, ge=0, le=100)
    sticky: bool = Field(
        True, description="A caller (its session header, else its key) keeps one version."
    )

    @field_validator("weights")
    @classmethod
    def _adds_up(cls, weights: dict[str, int]) -> dict[str, int]:
        # A field's validator: a 422 names `weights` as the field.
        if not weights:
            raise ValueError("name at least one version, e.g. {'v1': 100}")
        for version, weight in weights.items():
            if not 0 <= weight <= 100:
                raise ValueError(f"weights.{version}: {weight} is not a percent in 0..100")
        if (total := sum(weights.values())) != 100:
            raise ValueError(f"they sum to {total}; make them sum to 100 (given {weights})")
        return weights

    @model_validator(mode="after")
    def _shadow_named(self) -> TrafficSplit:
        if self.shadow_percent > 0 and self.shadow is None:
            raise ValueError("shadow: name the version that runs the shadow_percent share")
        return self

    def problems(self, served: Collection[str]) -> list[str]:
        """What this split names that the pipeline does not serve, field by field."""
        known = ", ".join(sorted(served, key=version_order))
        found = [
            f"weights.{v}: no version {v!r} is served (served: {known})"
            for v in self.weights
            if v not in served
        ]
        if self.shadow is not None and self.shadow not in served:
            found.append(f"shadow: no version {self.shadow!r} is served (served: {known})")
        return found


def default_split(served: Collection[str]) -> TrafficSplit:
    """Every request to the default version (the oldest): what a pipeline serves
    before anyone sets its traffic."""
    return TrafficSplit(weights={default_version(served): 100})


class UnknownVersion(LookupError):
    """A request pinned a version the pipeline does not serve (answered 404)."""

    def __init__(self, pipeline: str, asked: str, served: Collection[str]) -> None:
        self.served = sorted(served, key=version_order)
        super().__init__(
            f"pipeline {pipeline!r} serves no version {asked!r}; it serves "
            f"{', '.join(self.served)} (send one of them in X-Pipeline-Version, or none)"
        )


@dataclass(frozen=True)
class Route:
    """Where one request goes: the version that answers it and, maybe, a shadow."""

    version: str
    shadow: str | None = None
    pinned: bool = False


def point(pipeline: str, caller: str) -> float:
    """A caller's fixed place in [0, 1) for one pipeline."""
    digest = hashlib.sha256(f"{pipeline}\0{caller}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def route(
    pipeline: str,
    split: TrafficSplit,
    served: Collection[str],
    *,
    caller: str | None = None,
    pinned: str | None = None,
    rng: random.Random | None = None,
) -> Route:
    """The version that answers one request of `pipeline`, and its shadow if it has one.

    Raises:
        UnknownVersion: `pinned` names a version not served.
    """
    draw = (rng or random).random
    if pinned:
        if pinned not in served:
            raise UnknownVersion(pipeline, pinned, served)
        return Route(pinned, pinned=True)  # a pinned request is the caller's test: no shadow
    at = point(pipeline, caller) if split.sticky and caller else draw()
    version = _at(split.weights, at)
    shadow = None
    if split.shadow and split.shadow != version and draw() * 100 < split.shadow_percent:
        shadow = split.shadow
    return Route(version, shadow)


def _at(weights: Mapping[str, int], at: float) -> str:
    start = 0.0
    ordered = [v for v in sorted(weights, key=version_order) if weights[v] > 0]
    for version in ordered:
        start += weights[version] / 100
        if at < start:
            return version
    return ordered[-1]  # at = 1 - epsilon with rounding in the sum


class Board:
    """Every pipeline's split, one table for the whole cluster (in a `cluster_actor`):
    ingress replicas read it (`table`, with the revision they hold, so an unchanged
    table costs nothing), operators write it (`set`). Kept in `path` (written whole,
    then renamed into place), so a restart of the actor, or of the cluster, keeps it."""

    def __init__(self, path: str | os.PathLike[str] | None = None) -> None:
        if path is None:  # in the cluster's actor: where the settings say
            from servegraph.settings import AppSettings

            path = AppSettings().traffic_path
        self._path = Path(path)
        self._splits: dict[str, dict[str, Any]] = {}
        # Revisions follow the clock (microseconds since 1970, or one more than the last
        # when that is later), so a board that starts without its file starts past any
        # revision an earlier one gave out, and no replica takes its table for one it
        # already holds.
        self._revision = _now_us()
        if self._path.exists():
            self._load()

    def _load(self) -> None:
        """The saved table; a file that cannot be read is set aside (never lost, never
        in the way) and the board starts empty, all traffic to the defaults, saying so."""
        try:
            saved = json.loads(self._path.read_text())
            splits, revision = dict(saved["splits"]), int(saved["revision"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            aside = self._path.with_name(f"{self._path.name}.unreadable-{time.time_ns()}")
            os.replace(self._path, aside)
            logger.error(
                "traffic board: %s unreadable (%s); set aside as %s", self._path, exc, aside
            )
            return
        for pipeline, split in splits.items():
            try:
                self._splits[pipeline] = TrafficSplit.model_validate(split).model_dump()
            except ValidationError as exc:
                logger.error("traffic board: the saved split of %s is invalid: %s", pipeline, exc)
        self._revision = max(self._revision, revision)

    def set(self, pipeline: str, split: dict[str, Any] | None) -> int:
        """Set (None: clear) one pipeline's split; returns the new revision."""
        if split is None:
            self._splits.pop(pipeline, None)
        else:
            self._splits[pipeline] = TrafficSplit.model_validate(split).model_dump()
        self._revision = max(self._revision + 1, _now_us())
        self._save()
        return self._revision

    def table(self, known: int = -1) -> tuple[int, dict[str, dict[str, Any]] | None]:
        """(revision, every split), or (revision, None) when `known` is the revision."""
        if known == self._revision:
            return self._revision, None
        return self._revision, dict(self._splits)

    def _save(self) -> None:
        text = json.dumps({"revision": self._revision, "splits": self._splits}, indent=1)
        write_atomically(self._path, text)


def _now_us() -> int:
    return time.time_ns() // 1_000


def board() -> Any:
    """The cluster's traffic board (a `Board` in a `cluster_actor`), placed where the
    request routers are (`SERVEGRAPH_ROUTER_RESOURCES`: on a cluster, the head, whose
    disk holds its file)."""
    from servegraph._actors import cluster_actor
    from servegraph.settings import router_actor_options

    return cluster_actor(Board, BOARD_ACTOR, **router_actor_options())


class TrafficView:
    """An ingress replica's copy of the board's table, for the pipelines it serves
    (`served`: pipeline -> its versions; `board`: the board, with async methods:
    `servegraph.serving.versions.ActorBoard`). `split` answers from memory, never waiting
    on the board; `keep` refreshes the copy every `REFRESH_S` while the replica runs,
    so a change reaches every replica within about that.

    A split the board holds that names a version this replica does not serve (the
    versions were redeployed since) is not used: the pipeline's default split answers
    until the split is set again, and the replica says so in its log, once."""

    def __init__(self, served: Mapping[str, Collection[str]], board: Any = None) -> None:
        self.served = {name: frozenset(versions) for name, versions in served.items()}
        self._board = board  # async table(known) -> (revision, table or None)
        self._revision = -1
        self._splits: dict[str, TrafficSplit] = {}
        self._defaults = {name: default_split(v) for name, v in self.served.items()}
        self._warned: dict[str, int] = {}  # pipeline -> the revision last warned about

    @property
    def revision(self) -> int:
        return self._revision

    def split(self, pipeline: str) -> TrafficSplit:
        return self._splits.get(pipeline) or self._defaults[pipeline]

    def apply(self, revision: int, table: Mapping[str, Mapping[str, Any]]) -> None:
        """Take a table read from the board, unless this view holds a newer one (reads
        run side by side: a route's own read after a change, and `keep`'s)."""
        if revision <= self._revision:
            return
        splits: dict[str, TrafficSplit] = {}
        for pipeline, raw in table.items():
            if pipeline not in self.served:
                continue
            try:
                split = TrafficSplit.model_validate(raw)
            except ValidationError:  # the board validates what it takes: not expected
                logger.exception("traffic split of %s unreadable; its default answers", pipeline)
                continue
            if problems := split.problems(self.served[pipeline]):
                if self._warned.get(pipeline) != revision:
                    self._warned[pipeline] = revision
                    logger.warning(
                        "traffic split of %s not used here (%s); its default answers",
                        pipeline,
                        "; ".join(problems),
                    )
                continue
            splits[pipeline] = split
        self._splits, self._revision = splits, revision

    async def refresh(self) -> None:
        if self._board is None:
            return
        revision, table = await self._board.table(self._revision)
        if table is not None:
            self.apply(revision, table)

    async def keep(self) -> None:
        """Refresh every `REFRESH_S` until cancelled; a failed read keeps the last table
        (the board is restarted by Ray if it died)."""
        while True:
            try:
                await self.refresh()
            except asyncio.CancelledError:
                raise
            except Exception:
                logger.warning("reading the traffic board failed; keeping the last table")
            await asyncio.sleep(REFRESH_S)


def agreement(primary: Any, shadow: Any) -> float:
    """How alike two versions' answers to one request are, in [0, 1]: 1 when equal;
    else the overlap of their words (Jaccard, over every string in the answers, so an
    answer's text and its citations both count). No label is needed: what it measures is
    change, which a rollout weighs with the answer signals."""
    if primary == shadow:
        return 1.0
    a, b = _words(primary), _words(shadow)
    if not a and not b:
        return 0.0
    return len(a & b) / len(a | b)


def _words(value: Any) -> set[str]:
    if isinstance(value, str):
        return {w.strip(".,;:!?()[]\"'").lower() for w in value.split()} - {""}
    if isinstance(value, Mapping):
        return set().union(*(_words(v) for v in value.values())) if value else set()
    if isinstance(value, list | tuple):
        return set().union(*(_words(v) for v in value)) if value else set()
    return {str(value)} if value is not None else set()
