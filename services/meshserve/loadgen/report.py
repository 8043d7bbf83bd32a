"""What `meshserve bench` prints and saves: one table row per level, and a JSON file with everything.

Table columns: load (concurrency or request rate), requests sent, requests that failed (by status), output
tokens per second and successful requests per second over the level's wall time, then milliseconds over the
successful requests: time to first token p50/p90/p99, inter-token latency p50/p99 (per token), end to end
p50/p99.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from meshserve.loadgen.results import LevelResult, LevelSummary

# (heading, width, LevelSummary field, scale): latencies are kept in seconds and shown in ms.
COLUMNS = [
    ("tok/s", 9, "tokens_per_second", 1.0),
    ("req/s", 7, "requests_per_second", 1.0),
    ("TTFT p50", 9, "ttft_p50", 1e3),
    ("p90", 8, "ttft_p90", 1e3),
    ("p99", 8, "ttft_p99", 1e3),
    ("ITL p50", 8, "itl_p50", 1e3),
    ("p99", 8, "itl_p99", 1e3),
    ("E2E p50", 9, "e2e_p50", 1e3),
    ("p99", 9, "e2e_p99", 1e3),
]
LOAD_WIDTH = 18


def table_header() -> str:
    heading = f"{'load':<{LOAD_WIDTH}}{'requests':>9}{'failed':>7}"
    heading += "".join(f"{name:>{width}}" for name, width, _, _ in COLUMNS) + "  errors"
    return f"latencies in ms, over the requests that succeeded\n{heading}\n{'-' * len(heading)}"


def table_row(summary: LevelSummary) -> str:
    row = f"{summary.load:<{LOAD_WIDTH}}{summary.requests:>9}{summary.requests - summary.ok:>7}"
    for _, width, name, scale in COLUMNS:
        value = getattr(summary, name) * scale
        row += f"{'-':>{width}}" if math.isnan(value) else f"{value:>{width}.{_decimals(value)}f}"
    errors = ", ".join(f"{status} {count}" for status, count in summary.errors.items())
    return f"{row}  {errors or '-'}"


def _decimals(value: float) -> int:
    return 2 if abs(value) < 10 else 1 if abs(value) < 1000 else 0


def first_errors(result: LevelResult, most: int = 3) -> list[str]:
    """A line for each of the first few distinct failures of a level: what a person needs to see why."""
    seen: dict[tuple[str, str], int] = {}
    for record in result.records:
        if not record.ok and len(seen) < most:
            seen.setdefault((record.status, record.error), record.request.number)
    return [f"  request {number}: {status}: {error}" for (status, error), number in seen.items()]


def bench_json(target: dict[str, object], workload: dict[str, object], results: list[LevelResult]) -> dict[str, Any]:
    """The JSON document: {"target", "workload", "levels": [{"load", "summary", "records"}]}, seconds throughout."""
    return {
        "tool": "meshserve bench",
        "version": 1,
        "target": target,
        "workload": workload,
        "levels": [result.to_json() for result in results],
    }


def write_json(path: Path, document: dict[str, Any]) -> None:
    # Percentiles of no values are NaN, which JSON lacks: they are written as null.
    path.write_text(json.dumps(_nan_as_null(document), indent=1) + "\n")


def _nan_as_null(value: Any) -> Any:
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _nan_as_null(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_nan_as_null(v) for v in value]
    return value
