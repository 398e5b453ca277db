"""The capacity verdict as an operator reads it (`servegraph capacity`, `servegraph run`)."""

from __future__ import annotations

from servegraph.deploy.capacity.inputs import NodeType
from servegraph.deploy.capacity.search import Verdict


def report(verdict: Verdict, types: list[NodeType]) -> str:
    """The table `servegraph check` prints."""
    lines = [
        "node types: "
        + ", ".join(
            f"{t.name} x{t.max_count} ({', '.join(f'{k} {v:g}' for k, v in t.resources.items())})"
            for t in types
        )
    ]
    for label in ("min", "max"):
        used = [n for n in verdict.placements[label] if n.placed]
        ok = "fits" if verdict.fits(label) else "DOES NOT FIT"
        lines.append(f"\nat {label}_replicas: {ok} on {len(used)} node(s)")
        lines.append(f"  {'node':<12} {'placed':<64} headroom")
        for node in used:
            headroom = ", ".join(
                f"{k} {max(0.0, round(v, 3)):g}" for k, v in node.free.items() if k != "memory"
            )
            if node.gpus:
                headroom += ", GPU " + "/".join(f"{max(0.0, round(g, 3)):g}" for g in node.gpus)
            placed = ", ".join(_count(node.placed))
            lines.append(f"  {node.kind:<12} {placed:<64} {headroom}")
        if verdict.unplaced[label]:
            lines.append("  left pending: " + ", ".join(_count(verdict.unplaced[label])))
        risk = verdict.at_risk.get(label, [])
        if risk is None:
            lines.append("  whether every arrival order fits: not proven (search budget)")
        elif risk:
            lines.append(
                "  AT RISK: replicas arriving in an unlucky order can leave pending "
                + ", ".join(risk)
                + " (Ray never moves a placed replica); give the nodes headroom or pin"
            )
        elif verdict.fits(label):
            lines.append("  every arrival order fits")
    for label, (mix, price) in verdict.cheapest.items():
        nodes = " + ".join(f"{n} x {kind}" for kind, n in mix.items())
        cost = f" (${price:.2f}/h on demand)" if price is not None else ""
        lines.append(f"cheapest node mix at {label}_replicas: {nodes}{cost}")
    for name, why in verdict.never.items():
        lines.append(f"\nNEVER PLACEABLE {name}: {why}")
    for note in verdict.notes:
        lines.append(f"note: {note}")
    return "\n".join(lines)


def _count(replicas: list[str]) -> list[str]:
    counts: dict[str, int] = {}
    for replica in replicas:
        name = replica.rsplit("#", 1)[0]
        counts[name] = counts.get(name, 0) + 1
    return [f"{name} x{n}" if n > 1 else name for name, n in counts.items()]
