"""Pipeline timeline PNG (COACH-style): stages as rows, frames as bars, bubbles shaded; plus utilisation."""

from __future__ import annotations

import argparse
import asyncio
import itertools
import sys
from typing import Any

from fleetpipe import wire
from fleetpipe.config import BrokerConfig
from fleetpipe.metrics import HopStats, analyse_hops, frames_of

__all__ = ["record_results", "run_timeline", "timeline_png"]

_IDLE = "#f3c4c4"
_WAIT = "#d9d9d9"
_MAX_DRAWN = 60  # frames drawn in the timeline panel (all of them count in the utilisation panel)


def timeline_png(results_or_hops: Any, plan: wire.Plan | None, path: str) -> HopStats:
    """Draw the timeline (top panel) and per-stage utilisation, measured vs predicted (bottom) to ``path``."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    every = frames_of(results_or_hops)
    total = analyse_hops(every, plan)
    if len(every) <= _MAX_DRAWN:
        first, w0, w1 = 0, total.t0, total.t1
    else:  # zoom on the steady state in the middle; bars and bubbles still come from the whole run
        first = (len(every) - _MAX_DRAWN) // 2
        w0 = min(h.recv_ts for h in every[first])
        w1 = max(h.send_ts for h in every[first + _MAX_DRAWN - 1])
    frames = [f for f in every if f[-1].send_ts >= w0 and f[0].recv_ts <= w1]
    stats = total
    t0 = w0
    rows = stats.rows
    ypos = {(r.stage, r.node_id): len(rows) - 1 - i for i, r in enumerate(rows)}
    ms = lambda t: (t - t0) * 1000.0  # noqa: E731
    fig = Figure(figsize=(12, 2.5 + 0.55 * len(rows) + 2.6), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    ax, ax2 = fig.subplots(2, 1, height_ratios=[max(2.0, 0.55 * len(rows) + 1.0), 2.2])

    colours = _frame_colours(len(every))
    index = {id(f): i for i, f in enumerate(every)}
    by_row: dict[tuple[int, str], tuple[list[tuple[float, float]], list[Any]]] = {(r.stage, r.node_id): ([], [])
                                                                                 for r in rows}
    for f in frames:
        for h in f:
            start = max(h.recv_ts, h.send_ts - h.compute_ms / 1000.0)
            spans, cols = by_row[(h.stage, h.node_id)]
            spans.append((ms(start), (h.send_ts - start) * 1000.0))
            cols.append(colours[index[id(f)]])
    for r in rows:
        y = ypos[(r.stage, r.node_id)]
        if r.idle:
            ax.broken_barh([(ms(a), (b - a) * 1000.0) for a, b in r.idle], (y - 0.42, 0.84), facecolors=_IDLE,
                           edgecolor="none", hatch="//", zorder=1)
        if r.waits:
            ax.broken_barh([(ms(a), (b - a) * 1000.0) for a, b in r.waits], (y - 0.44, 0.1), facecolors=_WAIT,
                           edgecolor="#888888", linewidth=0.3, zorder=4)  # under the bars: queued behind a frame
        spans, cols = by_row[(r.stage, r.node_id)]
        if spans:
            ax.broken_barh(spans, (y - 0.32, 0.64), facecolors=cols, edgecolor="black", linewidth=0.4,
                           zorder=3)
    for f in frames:
        for prev, h in itertools.pairwise(f):
            ax.annotate("", xy=(ms(h.recv_ts), ypos[(h.stage, h.node_id)] + 0.32),
                        xytext=(ms(prev.send_ts), ypos[(prev.stage, prev.node_id)] - 0.32),
                        arrowprops={"arrowstyle": "-|>", "color": "#555555", "lw": 0.6, "shrinkA": 0, "shrinkB": 0},
                        zorder=4)
    wall_ms = (w1 - w0) * 1000.0
    if len(frames) <= 40:
        for f in frames:
            for h in f:
                if h.compute_ms >= 0.04 * wall_ms / max(1, len(frames) / 4):
                    ax.text(ms(h.send_ts) - h.compute_ms / 2, ypos[(h.stage, h.node_id)], str(index[id(f)]),
                            ha="center", va="center", fontsize=7, zorder=5)
    ax.set_yticks(range(len(rows)), [f"stage {r.stage} · {r.node_id}" for r in reversed(rows)])
    ax.set_xlim(0, wall_ms)
    ax.set_ylim(-0.6, len(rows) - 0.4)
    ax.set_xlabel("time (ms)")
    epoch = f" · epoch {plan.epoch}" if plan is not None else ""
    shown = f"zoom on frames {first}-{first + _MAX_DRAWN - 1} of {len(every)}" if first or len(every) > _MAX_DRAWN \
        else f"{len(every)} frames"
    ax.set_title(f"pipeline timeline · {shown} · {wall_ms:.0f} ms · "
                 f"{total.throughput_fps:.1f} fps overall{epoch}")
    ax.legend(handles=[Patch(facecolor=colours[0], edgecolor="black", label="compute (one colour per frame)"),
                       Patch(facecolor=_WAIT, label="queued (strip under the row)"),
                       Patch(facecolor=_IDLE, hatch="//", label="idle (bubble)"),
                       Patch(facecolor="white", edgecolor="#555555", label="arrow: transfer to next stage")],
              loc="upper center", bbox_to_anchor=(0.5, -0.18 if len(rows) > 2 else -0.3), ncol=4, fontsize=8,
              frameon=False)
    ax.grid(axis="x", alpha=0.3)

    _utilisation_panel(ax2, total, plan)
    fig.savefig(path, format="png")
    return total


async def record_results(url: str | BrokerConfig, fleet: str,
                         seconds: float) -> tuple[list[wire.Result], wire.Plan | None]:
    """Collect every result published in the fleet for ``seconds``, and the newest plan."""
    from fleetpipe.metrics import FleetView
    from fleetpipe.observe._collect import watch

    results: list[wire.Result] = []
    view = FleetView(fleet)

    def keep(msg: wire.Message) -> None:
        if isinstance(msg, wire.Result) and msg.fleet == fleet and msg.hops:
            results.append(msg)

    await watch(url, view, seconds=seconds, results=True, on_message=keep)
    return results, view.plan


def run_timeline(args: argparse.Namespace) -> int:
    """The ``timeline`` subcommand."""
    import matplotlib  # noqa: F401 - the plot extra: fail before recording, not after

    try:
        results, plan = asyncio.run(record_results(args.broker, args.fleet, args.seconds))
    except KeyboardInterrupt:
        return 130
    if not results:
        print(f"no results seen in fleet {args.fleet!r} within {args.seconds:g} s", file=sys.stderr)
        return 1
    if plan is not None:  # frames of other epochs would be drawn against the wrong plan
        results = [r for r in results if r.epoch == plan.epoch] or results
    stats = timeline_png(results, plan, args.output)
    util = ", ".join(f"stage {k} {u:.0%}" for k, u in sorted(stats.stage_utilisation.items()))
    print(f"{args.output}: {stats.frames} frames, {stats.throughput_fps:.1f} fps, utilisation {util}")
    return 0


# ---------------------------------------------------------------------------------------------- private


def _utilisation_panel(ax: Any, stats: HopStats, plan: wire.Plan | None) -> None:
    stages = sorted(stats.stage_utilisation)
    width = 0.38
    measured = [stats.stage_utilisation[k] for k in stages]
    bars = ax.bar([k - width / 2 for k in stages], measured, width, label="measured (busy / wall)",
                  color="#4c72b0")
    for b, k in zip(bars, stages, strict=True):
        ax.text(b.get_x() + b.get_width() / 2, b.get_height() + 0.02,
                f"{b.get_height():.0%}\n{stats.stage_compute_ms[k]:.1f} ms", ha="center", va="bottom", fontsize=8)
    if stats.predicted_utilisation:
        pred = [stats.predicted_utilisation.get(k, 0.0) for k in stages]
        pbars = ax.bar([k + width / 2 for k in stages], pred, width, label="predicted (plan)", color="#dd8452")
        if plan is not None:
            pms = {s.index: s.predicted_ms for s in plan.stages}
            for b, k in zip(pbars, stages, strict=True):
                ax.text(b.get_x() + b.get_width() / 2, b.get_height() + 0.02,
                        f"{b.get_height():.0%}\n{pms.get(k, 0.0):.1f} ms", ha="center", va="bottom", fontsize=8)
    ax.set_xticks(stages, [f"stage {k}" for k in stages])
    ax.set_ylim(0, 1.5)
    ax.set_ylabel("utilisation")
    ax.axhline(1.0, color="#999999", lw=0.6, ls="--")
    ax.set_title(f"stage utilisation over all {stats.frames} frames (busy / wall; the rest is bubbles)")
    ax.legend(loc="upper left", fontsize=8, frameon=False, ncol=2)


def _frame_colours(n: int) -> list[Any]:
    from matplotlib import colormaps

    cmap = colormaps["tab20"]
    return [cmap(i % 20) for i in range(max(n, 1))]
