"""A PNG of throughput and latency against load: output tok/s on the left, TTFT and ITL p50 and p99 (ms, log
scale) on the right, one point per level. matplotlib is the `bench` extra (pip install 'meshserve[bench]')."""

from __future__ import annotations

import math
from pathlib import Path

from meshserve.loadgen.results import LevelResult


def plot_levels(results: list[LevelResult], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only: no display, and no GUI toolkit needed
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FormatStrFormatter, NullLocator

    kinds = {r.level.kind for r in results}
    axis = {"concurrency": "concurrent streams", "rate": "requests per second"}.get(kinds.pop(), "load")
    if kinds:
        axis = "load (streams or requests per second)"
    loads = [r.level.value for r in results]
    summaries = [r.summary for r in results]
    figure, (throughput, latency) = plt.subplots(1, 2, figsize=(11, 4.2), layout="constrained")
    throughput.plot(loads, [s.tokens_per_second for s in summaries], marker="o", color="tab:blue")
    throughput.set(xlabel=axis, ylabel="output tokens per second", title="throughput")
    throughput.set_ylim(bottom=0)
    for name, values, style in (
        ("TTFT p50", [s.ttft_p50 for s in summaries], ("tab:orange", "-")),
        ("TTFT p99", [s.ttft_p99 for s in summaries], ("tab:orange", "--")),
        ("ITL p50", [s.itl_p50 for s in summaries], ("tab:green", "-")),
        ("ITL p99", [s.itl_p99 for s in summaries], ("tab:green", "--")),
    ):
        latency.plot(loads, [v * 1e3 for v in values], marker="o", color=style[0], linestyle=style[1], label=name)
    latency.set(xlabel=axis, ylabel="milliseconds", title="latency")
    if any(v > 0 and math.isfinite(v) for s in summaries for v in (s.ttft_p50, s.itl_p50)):
        latency.set_yscale("log")  # TTFT and ITL differ by orders of magnitude
        latency.yaxis.set_major_formatter(FormatStrFormatter("%g"))
    latency.legend()
    for axes in (throughput, latency):
        axes.grid(True, alpha=0.3)
        if len(loads) > 2 and min(loads) > 0 and max(loads) / min(loads) >= 8:
            axes.set_xscale("log", base=2)
        axes.set_xticks(loads, [f"{v:g}" for v in loads])  # a tick at each level, none between
        axes.xaxis.set_minor_locator(NullLocator())
    figure.suptitle(title)
    figure.savefig(path, dpi=110)
    plt.close(figure)
