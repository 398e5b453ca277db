"""Batch inference: any pipeline over a dataset, on Ray Data (`servegraph batch`).

The design, of the two the issue names: the pipeline's graph runs inside a pool of Ray
Data actors (`map_batches`), each a runtime like the ingress's, calling the deployed
model servers by handle. So a batch job shares the online path's model servers and
their dynamic batching (every row's embed joins the same forward passes as the online
callers'), without the HTTP hop, the ingress's admission gate or its per-request
deadline bookkeeping. Compiling a graph into Ray Data stages of its own (encoder actor
pools, `ray.data.llm`'s vLLM processor) would give offline throughput its own engines,
at the price of a second copy of every model and of the graph's semantics; that is the
next step if a batch job must not share the online servers.

Rows: JSONL, CSV or Parquet in, and out (the output's suffix says which). Every output
row carries the input's `id` (or its line number), its `line`, and either `output` and
`usage` (tokens, time and cost per node), or `error`; in CSV and Parquet those three
are columns of JSON text. A row the pipeline's input model refuses is written as an
error naming the field and the fix, and the job goes on.

Rows are appended as they finish to a JSON-lines journal: the output itself when it is
JSONL, else `<output>.partial.jsonl`, which becomes the CSV or Parquet file when the
job ends (a Parquet file cannot be appended to). So an interrupted job loses nothing
written, and re-running the same command skips the ids already written.
"""

from __future__ import annotations

import asyncio
import csv
import json
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

ROWS_PER_ACTOR = 32  # rows one actor runs at once (its batch); the model servers batch them
JSON_LINES = (".jsonl", ".ndjson", ".json")
COLUMNS = ("output", "usage", "error")  # JSON text in a CSV or Parquet output


@dataclass
class BatchReport:
    rows: int  # rows in the input
    skipped: int  # already in the output from an earlier run
    written: int  # rows this run wrote (results and errors)
    invalid: int  # refused by the pipeline's input model
    failed: int  # ran and failed (the error body says where)
    seconds: float

    @property
    def rows_per_s(self) -> float:
        run = self.written - self.invalid
        return run / self.seconds if self.seconds else 0.0


@dataclass
class _Row:
    id: str
    line: int
    body: dict[str, Any] | None  # None: the line was not a JSON object
    problem: str = ""


def batch(
    pipeline: str,
    input_path: str | Path,
    output_path: str | Path,
    *,
    concurrency: int = 64,
    max_cost_usd: float | None = None,
    package: str | None = None,
    catalog: str | None = None,
    on_progress: Callable[[int, int], None] | None = None,
) -> BatchReport:
    """Run `pipeline` over every row of `input_path`, appending results to `output_path`.

    Needs a Ray connection with the pipeline's model servers deployed (`servegraph batch`
    starts a local platform when given no address). `concurrency` is how many rows run
    at once in all; `max_cost_usd` each row's maximum cost (a row over it is an error
    row with status 402; see `servegraph.cost.budget.Budget`); `on_progress(done, total)` is
    called after every row written.
    """
    import ray

    from servegraph.lang.catalog import Catalog
    from servegraph.lang.compiled import compile as compile_graph
    from servegraph.lang.discovery import discover
    from servegraph.lang.graph import resolve
    from servegraph.settings import AppSettings

    settings = AppSettings()
    package = package or settings.pipelines
    catalog_path = catalog or settings.catalog
    graphs = discover(package)
    if pipeline not in graphs:
        raise KeyError(f"no pipeline {pipeline!r} in {package}: one of {sorted(graphs)}")
    cat: Catalog = resolve(catalog_path)
    input_model: type[BaseModel] = compile_graph(graphs[pipeline], cat).input

    started = time.monotonic()
    output = Path(output_path)
    output.parent.mkdir(parents=True, exist_ok=True)
    journal = _journal(output)
    if journal != output and output.exists() and not journal.exists():
        _write_lines(journal, _read_results(output))  # a finished earlier run: resume it
    done = _written_ids(journal)
    rows = list(_read(Path(input_path)))
    todo: list[_Row] = []
    invalid: list[tuple[_Row, dict[str, Any]]] = []
    for row in rows:
        if row.id in done:
            continue
        error = _invalid(row, input_model)
        if error:
            invalid.append((row, error))
        else:
            todo.append(row)
    report = BatchReport(len(rows), len(rows) - len(todo) - len(invalid), 0, len(invalid), 0, 0)
    total = len(todo) + len(invalid)
    with journal.open("a") as out:

        def write(line: dict[str, Any]) -> None:
            out.write(_json_line(line))
            out.flush()
            report.written += 1
            if on_progress:
                on_progress(report.written, total)

        for row, error in invalid:
            write({"id": row.id, "line": row.line, "error": error})
        if todo:
            data = ray.data.DataContext.get_current()
            data.enable_progress_bars = False  # ours is the one with rows/s and ETA
            items = [{"id": r.id, "line": r.line, "body": json.dumps(r.body)} for r in todo]
            actors = max(1, min(len(items) // ROWS_PER_ACTOR + 1, concurrency // ROWS_PER_ACTOR))
            results = ray.data.from_items(items).map_batches(
                _Runner,
                fn_constructor_kwargs={
                    "pipeline": pipeline,
                    "package": package,
                    "catalog": catalog_path,
                    "max_cost_usd": max_cost_usd,
                },
                batch_size=ROWS_PER_ACTOR,
                compute=ray.data.ActorPoolStrategy(size=actors),
                num_cpus=0.25,  # the actor awaits the model servers; their replicas compute
            )
            for result in results.iter_rows():
                line = json.loads(result["result"])
                report.failed += "error" in line
                write(line)
    if journal != output:
        _write_results(output, _read_results(journal))
        journal.unlink()
    report.seconds = time.monotonic() - started
    return report


def _journal(output: Path) -> Path:
    """Where rows are appended as they finish (module docstring)."""
    if output.suffix.lower() in JSON_LINES:
        return output
    if output.suffix.lower() not in (".csv", ".parquet"):
        raise ValueError(f"{output}: write a .jsonl, .csv or .parquet file, please")
    return output.with_name(output.name + ".partial.jsonl")


def _read_results(path: Path) -> list[dict[str, Any]]:
    """The result rows of an output or journal, whatever its format."""
    suffix = path.suffix.lower()
    if suffix in JSON_LINES:
        return [json.loads(t) for t in path.read_text().splitlines() if t.strip()]
    if suffix == ".csv":
        with path.open(newline="") as f:
            flat = list(csv.DictReader(f))
    else:
        import pyarrow.parquet as pq

        flat = pq.read_table(path).to_pylist()
    return [
        {
            "id": str(row["id"]),
            "line": int(row["line"]),
            **{k: json.loads(row[k]) for k in COLUMNS if row.get(k)},
        }
        for row in flat
    ]


def _json_line(row: dict[str, Any]) -> str:
    return json.dumps(row, separators=(",", ":")) + "\n"


def _write_lines(path: Path, rows: list[dict[str, Any]]) -> None:
    with path.open("w") as f:
        f.writelines(_json_line(r) for r in rows)


def _write_results(path: Path, rows: list[dict[str, Any]]) -> None:
    """`rows` as a CSV or Parquet file at `path`, in place at once (a reader never sees
    half a file): `id`, `line`, and `output`, `usage`, `error` as JSON text."""
    flat = [
        {
            "id": r["id"],
            "line": r["line"],
            **{k: json.dumps(r[k], separators=(",", ":")) if k in r else None for k in COLUMNS},
        }
        for r in rows
    ]
    partial = path.with_name(path.name + ".writing")
    if path.suffix.lower() == ".csv":
        with partial.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["id", "line", *COLUMNS])
            writer.writeheader()
            writer.writerows(flat)
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        schema = pa.schema(
            [("id", pa.string()), ("line", pa.int64()), *((k, pa.string()) for k in COLUMNS)]
        )
        pq.write_table(pa.Table.from_pylist(flat, schema=schema), partial)
    os.replace(partial, path)


class _Runner:
    """A Ray Data actor: runs the pipeline on a batch of rows, all at once, against the
    deployed model servers."""

    def __init__(
        self, pipeline: str, package: str, catalog: str, max_cost_usd: float | None = None
    ) -> None:
        from servegraph.engine.runtime import Runtime
        from servegraph.lang.compiled import compile as compile_graph
        from servegraph.lang.discovery import discover
        from servegraph.lang.graph import resolve
        from servegraph.serving.handles import ServeInvoker
        from servegraph.telemetry import tracing

        cat = resolve(catalog)
        invoker = ServeInvoker(cat)
        self.graph = compile_graph(discover(package)[pipeline], cat)
        self.runtime = Runtime(
            cat,
            invoker,
            node_hook=tracing.node_hook(pipeline),
            invoke_stream=getattr(invoker, "stream", None),
        )
        self.loop = asyncio.new_event_loop()
        self.max_cost_usd = max_cost_usd

    def __call__(self, rows: dict[str, Any]) -> dict[str, list[str]]:
        results = self.loop.run_until_complete(self._all(rows))
        return {"result": [json.dumps(r, separators=(",", ":")) for r in results]}

    async def _all(self, rows: dict[str, Any]) -> list[dict[str, Any]]:
        return await asyncio.gather(
            *(
                self._one(str(i), int(n), json.loads(b))
                for i, n, b in zip(rows["id"], rows["line"], rows["body"], strict=True)
            )
        )

    async def _one(self, row_id: str, line: int, body: dict[str, Any]) -> dict[str, Any]:
        from servegraph.cost.budget import Budget
        from servegraph.engine.runtime import NodeRecord
        from servegraph.errors import PipelineRuntimeError
        from servegraph.serving.http import runtime_error_body
        from servegraph.serving.ingress import usage_of

        records: list[NodeRecord] = []
        started = time.perf_counter()
        budget = Budget(self.max_cost_usd) if self.max_cost_usd else None
        try:
            result = await self.runtime.execute(self.graph, body, records=records, budget=budget)
        except PipelineRuntimeError as exc:
            error = {"status": exc.status_code, **runtime_error_body(exc)}
            return {"id": row_id, "line": line, "error": error}
        usage = usage_of(records, (time.perf_counter() - started) * 1000, budget)
        output = result.output.model_dump(mode="json")
        return {"id": row_id, "line": line, "output": output, "usage": usage}


def _read(path: Path) -> Iterator[_Row]:
    """The input's rows with their line numbers (1-based; a CSV's header is line 1)."""
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".ndjson", ".json"):
        with path.open() as f:
            for n, text in enumerate(f, start=1):
                if not text.strip():
                    continue
                try:
                    body = json.loads(text)
                except ValueError as exc:
                    yield _Row(str(n), n, None, f"not JSON: {exc}")
                    continue
                if not isinstance(body, dict):
                    yield _Row(str(n), n, None, "not a JSON object")
                    continue
                yield _Row(str(body.pop("id", n)), n, body)
    elif suffix == ".csv":
        with path.open(newline="") as f:
            reader = csv.DictReader(f)
            for body in reader:
                n = reader.line_num
                yield _Row(str(body.pop("id", None) or n), n, dict(body))
    elif suffix == ".parquet":
        import pyarrow.parquet as pq

        for n, body in enumerate(pq.read_table(path).to_pylist(), start=1):
            yield _Row(str(body.pop("id", None) or n), n, body)
    else:
        raise ValueError(f"{path}: a .jsonl, .csv or .parquet file, please")


def _invalid(row: _Row, model: type[BaseModel]) -> dict[str, Any] | None:
    """The error row's body when the pipeline's input model refuses the row."""
    from servegraph._fields import field_errors

    if row.body is None:
        detail = [{"field": "(line)", "error": row.problem, "fix": "one JSON object per line"}]
        return {"error": "invalid row", "detail": detail}
    try:
        model.model_validate(row.body)
    except ValidationError as exc:
        errors: list[dict[str, Any]] = [dict(e) for e in exc.errors()]
        return {"error": "invalid row", "detail": field_errors(errors)}
    return None


def _written_ids(output: Path) -> set[str]:
    """Ids an earlier run already wrote (a torn last line, from a kill, is dropped)."""
    if not output.exists():
        return set()
    lines = output.read_text().splitlines(keepends=True)
    if lines and not lines[-1].endswith("\n"):  # the write a kill interrupted
        with output.open("r+") as f:
            f.truncate(sum(len(t.encode()) for t in lines[:-1]))
        lines.pop()
    return {str(json.loads(text)["id"]) for text in lines if text.strip()}
