"""``fleetpipe top``: a rich view of a :class:`fleetpipe.metrics.FleetSnapshot`, live or rendered once."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import sys
import time
from typing import Any

from fleetpipe import timing
from fleetpipe.metrics import FleetSnapshot, FleetView

__all__ = ["once_window_s", "render", "render_text", "run_top"]

_MAX_ROWS = 5  # errors and re-plans shown
ONCE_HEALTH_REPORTS = 3  # top --once listens for this many health intervals (two reports per node at any phase)


def render(snap: FleetSnapshot, broker_lost: str | None = None) -> Any:
    """A rich renderable of the whole view; ``broker_lost`` (the broker URL) when top's connection is down."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    p, plan = snap.pipeline, snap.plan
    head = Text()
    head.append(f"fleetpipe top · fleet {snap.fleet}", style="bold")
    head.append(f" · {time.strftime('%H:%M:%S', time.localtime(snap.now))}\n")
    if broker_lost is not None:
        head.append(f"broker connection lost ({broker_lost}): reconnecting; the figures below are stale\n",
                    style="bold red")
    if plan is None:
        head.append("no plan yet", style="yellow")
    else:
        head.append(f"plan epoch {plan.epoch} · model {plan.model_id} · {len(plan.stages)} stages · ")
    head.append(f" {p.nodes_alive}/{len(snap.nodes)} nodes alive\n")
    head.append(f"throughput {p.throughput_fps:.1f} fps", style="bold green")
    if p.predicted_fps:
        head.append(f" (predicted {p.predicted_fps:.1f}" + (
            f", {p.calibrated_fps:.1f} with measured compute)" if p.calibrated_fps else ")"))
    if p.latency_ms_p50 is not None:
        head.append(f" · latency p50 {p.latency_ms_p50:.1f} / p90 {p.latency_ms_p90:.1f} / "
                    f"p99 {p.latency_ms_p99:.1f} ms")
    if p.bottleneck_stage is not None:
        head.append(f" · bottleneck stage {p.bottleneck_stage} at {p.bottleneck_utilisation:.0%}", style="bold")

    nodes = Table(title="nodes", title_justify="left", expand=False, pad_edge=False)
    for col in ("node", "up", "class", "stage", "ep", "bits", "queue", "in", "out", "fps", "comp ms", "xfer ms",
                "idle ms", "util", "load", "seen"):
        nodes.add_column(col, justify="left" if col in ("node", "class", "up", "util") else "right",
                         no_wrap=True)
    for n in snap.nodes:
        seen = f"{snap.now - n.last_seen:.1f}s" if n.last_seen is not None else "-"
        up = Text("up", style="green") if n.alive else Text(n.death_reason or "stale", style="red")
        nodes.add_row(n.node_id, up, n.device_class, "-" if n.stage is None else str(n.stage), str(n.epoch),
                      str(n.bits), str(n.queue_depth), str(n.frames_in), str(n.frames_out), f"{n.fps_out:.1f}",
                      f"{n.compute_ms:.1f}", f"{n.transfer_ms:.1f}", f"{n.idle_ms:.1f}", _bar(n.utilisation),
                      f"{n.load:.2f}", seen)

    parts: list[Any] = [head, nodes]
    if plan is not None:
        stages = Table(title="stages", title_justify="left", pad_edge=False)
        for col in ("stage", "layers", "devices", "bits", "pred ms", "comp ms", "xfer ms", "bubble ms", "util",
                    "pred util", "queue", "fps"):
            stages.add_column(col, justify="left" if col in ("stage", "devices", "util") else "right", no_wrap=True)
        for s, ps in zip(snap.stages, plan.stages, strict=True):
            devices = ",".join(s.nodes) + ("" if s.alive == len(s.nodes) else f" ({s.alive} up)")
            stages.add_row(f"stage {s.index}", f"{ps.first_layer}-{ps.last_layer}", devices, str(s.bits),
                           f"{s.predicted_ms:.1f}", f"{s.compute_ms:.1f}", f"{s.transfer_ms:.1f}",
                           f"{s.idle_ms:.1f}", _bar(s.utilisation), f"{s.predicted_utilisation:.0%}",
                           str(s.queue_depth), f"{s.fps_out:.1f}")
        parts.append(stages)
    if snap.replans:
        t = Text("re-plans\n", style="bold")
        for r in snap.replans[-_MAX_ROWS:]:
            t.append(f"  {_clock(r.ts)} epoch {r.old_epoch} -> {r.new_epoch}: {r.stages} stages, "
                     f"bottleneck {r.bottleneck_ms:.1f} ms\n")
        parts.append(t)
    if snap.errors:
        t = Text(f"recent errors ({snap.errors_seen} seen)\n", style="bold red")
        for e in snap.errors[-_MAX_ROWS:]:
            frame = f" frame {e.frame_id}" if e.frame_id else ""
            t.append(f"  {_clock(e.ts)} {e.source}: {e.kind}{frame}: {e.detail[:100]}\n")
        parts.append(t)
    return Group(*parts)


def render_text(snap: FleetSnapshot, width: int = 140) -> str:
    """The view as plain text (headless use and tests)."""
    from rich.console import Console

    console = Console(width=width, record=True, file=io.StringIO(), color_system=None)
    console.print(render(snap))
    return console.export_text()


def run_top(args: argparse.Namespace) -> int:
    """The ``top`` subcommand."""
    view = FleetView(args.fleet, window_s=max(5.0, 3 * args.interval))
    try:
        if args.once:
            return asyncio.run(_once(args, view))
        return asyncio.run(_live(args, view))
    except KeyboardInterrupt:
        return 130


# ---------------------------------------------------------------------------------------------- private


def once_window_s(interval_s: float) -> float:
    """How long ``top --once`` listens: rates need two health reports of every node, so at least
    ``ONCE_HEALTH_REPORTS`` health intervals, and at least ``--interval``."""
    return max(interval_s, ONCE_HEALTH_REPORTS * timing.HEALTH_INTERVAL_S)


async def _once(args: argparse.Namespace, view: FleetView) -> int:
    from fleetpipe.observe._collect import watch

    await watch(args.broker, view, seconds=once_window_s(args.interval), results=not args.no_results)
    width = args.width or (None if sys.stdout.isatty() else 140)
    sys.stdout.write(render_text(view.snapshot(), width or 140))
    sys.stdout.flush()
    return 0


async def _live(args: argparse.Namespace, view: FleetView) -> int:
    from rich.console import Console
    from rich.live import Live

    from fleetpipe.observe._collect import watch

    stop = asyncio.Event()
    buses: list[Any] = []
    task = asyncio.create_task(watch(args.broker, view, stop=stop, results=not args.no_results,
                                     on_bus=buses.append))
    console = Console(width=args.width) if args.width else Console()

    def frame() -> Any:
        lost = bool(buses) and not buses[0].connected
        return render(view.snapshot(), broker_lost=getattr(args.broker, "url", None) or "broker" if lost else None)

    try:
        with Live(frame(), console=console, auto_refresh=False, screen=False) as live:
            while not task.done():
                await asyncio.wait({task}, timeout=args.interval)
                live.update(frame(), refresh=True)
    finally:
        stop.set()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    task.result()  # re-raise a broker error
    return 0


def _bar(u: float, width: int = 8) -> str:
    u = min(max(u, 0.0), 1.0)
    full = round(u * width)
    return "█" * full + "░" * (width - full) + f" {u:4.0%}"


def _clock(ts: float) -> str:
    return time.strftime("%H:%M:%S", time.localtime(ts))
