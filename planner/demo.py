"""``fleetpipe demo``: a private mosquitto, an emulated heterogeneous fleet, a real model split and streamed.

Everything runs for real on this machine: a mosquitto on a free loopback port (lab config), one
planner process and N node processes talking only over MQTT, each node running its onnxruntime slice
with compute stretched and outbound bytes paced to its emulated device class. The demo streams frames
through the fleet, checks every output against the whole model run locally, and prints per-stage and
fleet figures. Ctrl-C (or any error) stops every process it started.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["DEFAULT_CLASSES", "DemoReport", "register", "run", "run_demo"]

DEFAULT_CLASSES = ("jetson-nano", "rpi5", "rpi4", "rpi4-wifi")
DEFAULT_MODEL = "resnet50"
DEFAULT_MODEL_ARGS: dict[str, dict[str, Any]] = {
    "resnet50": {"width": 1.0, "resolution": 128},
    "resnet18": {"width": 0.5, "resolution": 112},
    "vgg16": {"width": 0.25, "resolution": 64},
    "mobilenetv2": {"width": 1.0, "resolution": 112},
    "inception": {"width": 0.5, "resolution": 96},
    "vit": {},
}


def register(subparsers: Any) -> None:
    """Add the ``demo`` subcommand."""
    p = subparsers.add_parser("demo", help="run an emulated fleet on this machine and stream a real model")
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"zoo model (default {DEFAULT_MODEL}) or an .onnx or .tflite file (told apart by content)")
    p.add_argument("--input-shape", action="append", default=[], metavar="NAME=D,D,...",
                   help="static shape of a model input with dynamic dims, e.g. x=1,3,224,224 (repeatable; a dynamic "
                        "batch dim alone is taken as 1)")
    p.add_argument("--nodes", type=int, default=len(DEFAULT_CLASSES), help="number of emulated nodes")
    p.add_argument("--classes", default=",".join(DEFAULT_CLASSES),
                   help="device classes, cycled over the nodes (rpi3, rpi4, rpi4-wifi, rpi5, jetson-nano, x86, 2.5, "
                   "...)")
    p.add_argument("--frames", type=int, default=48, help="frames to stream")
    p.add_argument("--window", type=int, default=None, help="frames in flight (default: 3 per node)")
    p.add_argument("--bits", type=int, default=8, help="activation bit-width between stages")
    p.add_argument("--tolerance", type=float, default=None,
                   help="relative L2 error allowed per output, for the planner's bit floors and the final check "
                        "(default 0.01)")
    p.add_argument("--no-bit-floors", dest="bit_floors", action="store_false",
                   help="let the planner ship --bits at every cut unchecked (the final check still applies)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--plot", metavar="PNG", help="write a pipeline timeline PNG")
    p.add_argument("--keep-logs", metavar="DIR", help="keep node/planner logs in DIR")
    p.set_defaults(func=run)


@dataclass(frozen=True, slots=True)
class DemoReport:
    """What the demo measured."""

    model: str
    stages: list[dict[str, Any]]
    frames: int
    fleet_fps: float
    predicted_fps: float
    single_fps: float
    best_single_node: str
    fleet_latency_ms: float
    single_latency_ms: float
    top1_agreement: float | None  # None: no classifier-shaped output (an argmax over a map means nothing)
    max_rel_error: float
    resent: int
    duplicates: int
    plan_s: float
    results: list[Any] = field(default_factory=list, repr=False, compare=False)
    # frames / whole streaming time, pipeline fill and drain included (``fleet_fps`` is the steady state)
    wall_fps: float = 0.0
    # the plan re-scored with the compute each node measured (hop timings): what the runtime should deliver
    # if it lost nothing to codec, MQTT or bubbles (``fleetpipe.metrics.calibrated_period_ms``)
    calibrated_fps: float = 0.0
    node_classes: dict[str, str] = field(default_factory=dict)  # node name -> its --emulate class
    # fleetpipe.accuracy per output: name, shape, frames, rel_l2 (worst frame), max_abs, top1 (classifiers)
    accuracy: list[dict[str, Any]] = field(default_factory=list)
    tolerance: float = 0.01
    accuracy_ok: bool = True
    bit_widths: str = ""  # the planner's line: bits shipped per cut and why (calibrated floor / probe tolerance)

    def as_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict (without the raw results)."""
        return {k: getattr(self, k) for k in self.__dataclass_fields__ if k != "results"}


def run(args: argparse.Namespace) -> int:
    """CLI entry: run the demo and print a table (or JSON)."""
    from rich.console import Console

    console = Console(stderr=args.json)
    classes = [c.strip() for c in args.classes.split(",") if c.strip()]
    from fleetpipe.errors import FleetpipeError

    if args.plot:
        import matplotlib  # noqa: F401 - the plot extra: fail now, not after the whole run
    stopped_by: list[int] = []
    try:
        with _stop_on_signals(stopped_by):
            report = run_demo(model=args.model, nodes=args.nodes, classes=classes, frames=args.frames,
                              window=args.window, bits=args.bits, console=console, log_dir=args.keep_logs,
                              plot=args.plot, input_shape=tuple(getattr(args, "input_shape", ()) or ()),
                              **_accuracy_kwargs(args))
    except FleetpipeError as exc:  # the model cannot be read, pinned or run here: before any process starts
        print(f"fleetpipe demo: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        console.print("[yellow]interrupted; fleet stopped[/]")
        return 128 + (stopped_by[0] if stopped_by else signal.SIGINT)
    if args.json:
        print(json.dumps(report.as_dict(), indent=1))
    else:
        print_report(report, console)
    return 0 if report.accuracy_ok else 1


def run_demo(*, model: str = DEFAULT_MODEL, nodes: int = 4, classes: list[str] | None = None, frames: int = 48,
             window: int | None = None, bits: int = 8, console: Any = None, log_dir: str | None = None,
             plot: str | None = None, fleet: str | None = None, tolerance: float | None = None,
             bit_floors: bool = True, input_shape: tuple[str, ...] = ()) -> DemoReport:
    """Start broker, planner and nodes; stream ``frames``; return the measured report."""
    import numpy as np
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from fleetpipe.broker import LocalBroker
    from fleetpipe.client import FleetClient
    from fleetpipe.metrics import calibrated_period_ms
    from fleetpipe.node.emulate import parse_emulate

    console = console or Console()
    classes = classes or list(DEFAULT_CLASSES)
    # A private fleet name: two demos on one LAN (or one machine) never mix.
    fleet = fleet or f"demo-{os.getpid()}"
    # Enough frames in flight to fill every compute and transfer stage, plus the client's own hops.
    window = window or 3 * nodes
    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="fleetpipe-demo-")))
        logs = Path(log_dir) if log_dir else tmp
        logs.mkdir(parents=True, exist_ok=True)
        model_path, loaded, model_name = _materialise_model(model, tmp, input_shape)
        broker = stack.enter_context(LocalBroker())
        console.print(f"[bold]fleetpipe demo[/]: mosquitto on {broker.url}, fleet {fleet}, model {model_name}, "
                      f"{nodes} nodes ({', '.join(classes[i % len(classes)] for i in range(nodes))})")
        console.print(f"watch it from another terminal: fleetpipe top --broker {broker.url} --fleet {fleet}")
        procs = stack.enter_context(_processes())
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
        base = [sys.executable, "-m", "fleetpipe"]
        t0 = time.monotonic()
        procs.append(_spawn([*base, "-v", "planner", "--broker", broker.url, "--model", str(model_path), "--fleet",
                             fleet, "--expect-nodes", str(nodes), "--bits", str(bits), "--interface", "127.0.0.1",
                             *_planner_bit_args(tolerance, bit_floors),
                             *[arg for item in input_shape for arg in ("--input-shape", item)]],
                            logs / "planner.log", env))
        # The planner profiles the model on this host first; starting the nodes only then keeps their start-up
        # from stealing cycles from that profile, which every prediction is scaled from.
        with console.status("profiling the model"):
            _wait_profiled(procs[-1], logs / "planner.log")
        node_classes = {}
        for i in range(nodes):
            cls = classes[i % len(classes)]
            name = f"{cls.replace('.', '_')}-{i}"
            node_classes[name] = cls
            procs.append(_spawn([*base, "node", "--broker", broker.url, "--fleet", fleet, "--name", name,
                                 "--emulate", cls, "--cache-dir", str(tmp / "cache" / name),
                                 "--interface", "127.0.0.1"],
                                logs / f"node-{name}.log", env))
        client = stack.enter_context(FleetClient(broker.url, fleet=fleet, window=window))
        with console.status("planning: profiling the model, solving, slicing, loading slices on the nodes"):
            plan = _wait_plan(client, procs, logs)
        plan_s = time.monotonic() - t0

        inputs = _frames(loaded.graph, max(frames, 4))
        local = loaded.runner(threads=1)  # the whole model as given, in its own runtime (onnxruntime or LiteRT)
        reference = _reference_outputs(local, inputs)
        whole_ms = _time_local(local, inputs[0])

        # Latency: a few frames one at a time.
        latencies = [client.infer_result(x).latency_ms for x in inputs[:3]]
        results = []
        with Progress(TextColumn("streaming"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      console=console, transient=True) as progress:
            task = progress.add_task("frames", total=frames)
            start = time.monotonic()
            arrivals = []
            for result in client.stream(inputs[:frames]):
                results.append(result)
                arrivals.append(time.monotonic())
                progress.advance(task)
            wall = time.monotonic() - start
        # Steady-state throughput, the quantity the planner predicts: results per second between the first
        # result and the last, so the pipeline's fill (one frame's latency) is not charged to its rate.
        span = arrivals[-1] - arrivals[0] if len(arrivals) > 1 else 0.0
        steady = (len(arrivals) - 1) / span if span > 0 else len(results) / wall

        check = compare_demo_outputs(results, reference, tolerance)
        stages = _stage_rows(plan, results, _stage_wire_bytes(loaded.graph, plan))
        period = calibrated_period_ms(plan, _node_compute_ms(results))
        factors = {n: parse_emulate(c).compute_factor for n, c in node_classes.items()}
        best = min(factors, key=lambda n: factors[n])
        single_ms = whole_ms * factors[best]
        if plot:
            from fleetpipe.observe import timeline_png

            timeline_png(results, plan, plot)
        return DemoReport(
            model=model_name, stages=stages, frames=len(results), fleet_fps=steady,
            predicted_fps=1000.0 / plan.bottleneck_ms if plan.bottleneck_ms else 0.0,
            single_fps=1000.0 / single_ms, best_single_node=best,
            fleet_latency_ms=float(np.median(latencies)), single_latency_ms=single_ms,
            top1_agreement=check.top1, max_rel_error=check.worst_rel_l2, resent=client.stats.resent,
            duplicates=client.stats.duplicates, plan_s=plan_s, results=results, wall_fps=len(results) / wall,
            calibrated_fps=1000.0 / period if period else 0.0, node_classes=node_classes,
            bit_widths=_bit_widths_line(logs / "planner.log"),
            accuracy=[dataclasses.asdict(o) for o in check.outputs], tolerance=check.tolerance,
            accuracy_ok=check.ok)
    raise AssertionError("unreachable")  # pragma: no cover


def print_report(report: DemoReport, console: Any) -> None:
    """Print the demo's tables."""
    from rich.table import Table

    table = Table(title=f"fleetpipe demo: {report.model} over {len(report.stages)} stages")
    for col in ("stage", "device", "layers", "bits", "predicted ms", "measured ms"):
        table.add_column(col, justify="right" if "ms" in col or col in ("stage", "bits") else "left")
    for s in report.stages:
        table.add_row(str(s["stage"]), s["device"], s["layers"], str(s["bits"]), f"{s['predicted_ms']:.1f}",
                      f"{s['measured_ms']:.1f}")
    console.print(table)
    summary = Table(title="fleet vs best single node", show_header=True)
    summary.add_column("")
    summary.add_column("fleet", justify="right")
    summary.add_column(f"best single ({report.best_single_node})", justify="right")
    summary.add_column("ratio", justify="right")
    summary.add_row("throughput (frames/s)", f"{report.fleet_fps:.2f}", f"{report.single_fps:.2f}",
                    f"{report.fleet_fps / report.single_fps:.2f}x")
    summary.add_row("latency (ms, one frame)", f"{report.fleet_latency_ms:.0f}", f"{report.single_latency_ms:.0f}",
                    f"{report.fleet_latency_ms / report.single_latency_ms:.2f}x")
    console.print(summary)
    console.print(f"planner predicted {report.predicted_fps:.2f} frames/s; measured (steady state, first to last "
                  f"result) is {100 * report.fleet_fps / max(report.predicted_fps, 1e-9):.0f}% of predicted; "
                  f"{report.wall_fps:.2f} frames/s over the whole stream, pipeline fill included")
    if report.calibrated_fps:
        console.print(f"the plan re-scored with the compute the nodes measured: {report.calibrated_fps:.2f} frames/s; "
                      f"measured is {100 * report.fleet_fps / report.calibrated_fps:.0f}% of that (what codec, "
                      f"MQTT and bubbles cost)")
    if report.bit_widths:
        console.print(report.bit_widths)
    print_accuracy(report, console)
    console.print(f"{report.frames} frames, {report.resent} re-sent, {report.duplicates} duplicate results dropped; "
                  f"fleet up and planned in {report.plan_s:.1f} s")


# -- output check (fleetpipe.accuracy) --------------------------------------------------------


def compare_demo_outputs(results: list[Any], reference: list[dict[str, Any]], tolerance: float | None = None) -> Any:
    """Every output of the fleet's results against the whole model's (a ``fleetpipe.accuracy.Comparison``)."""
    from fleetpipe.accuracy import DEFAULT_TOLERANCE, compare_outputs

    tol = DEFAULT_TOLERANCE if tolerance is None else float(tolerance)
    return compare_outputs([r.outputs for r in results], reference[: len(results)], tolerance=tol)


def print_accuracy(report: DemoReport, console: Any) -> None:
    """Per output: relative L2 and max abs (top-1 for classifier-shaped outputs); red when over the tolerance."""
    console.print("outputs vs whole model run locally:")
    for o in report.accuracy:
        top = "" if o["top1"] is None else f", top-1 agreement {100 * o['top1']:.1f}%"
        over = o["rel_l2"] > report.tolerance
        style = "red" if over else "green"
        console.print(f"  [{style}]{o['name']} {tuple(o['shape'])}: max relative L2 error {o['rel_l2']:.4f}, "
                      f"max abs {o['max_abs']:.3g}{top}[/]")
    if report.accuracy_ok:
        console.print(f"[green]every output within the tolerance ({report.tolerance:g} relative L2)[/]")
    else:
        what = "no output could be compared" if not report.accuracy else (
            f"worst relative L2 error {report.max_rel_error:.4f}")
        console.print(f"[bold red]FAILED: {what} exceeds the tolerance {report.tolerance:g}[/] "
                      f"(raise --bits, or drop --no-bit-floors)")


def _reference_outputs(local: Any, inputs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The whole model's outputs (every one, by name) for each input frame (``local``: LoadedModel.runner())."""
    return [local(x) for x in inputs]


def _frames(graph: Any, n: int, seed: int = 0) -> list[dict[str, Any]]:
    """``n`` seeded random frames, one array per model input (by name, at the graph's pinned shape and dtype)."""
    from fleetpipe.models.profile import random_feeds

    return [random_feeds(graph, seed + i) for i in range(n)]


def _bit_widths_line(log: Path) -> str:
    """The planner's last "bit-widths from ..." log line (what it shipped per cut and why), or ""."""
    marker = "planner: bit-widths from "
    try:
        lines = [ln for ln in log.read_text(errors="replace").splitlines() if marker in ln]
    except OSError:
        return ""
    return lines[-1][lines[-1].index(marker) + len("planner: "):] if lines else ""


def _planner_bit_args(tolerance: float | None, bit_floors: bool) -> list[str]:
    return [*(["--bit-tolerance", str(tolerance)] if tolerance is not None else []),
            *([] if bit_floors else ["--no-bit-floors"])]


def _accuracy_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    return {"tolerance": getattr(args, "tolerance", None), "bit_floors": getattr(args, "bit_floors", True)}


# -- helpers -------------------------------------------------------------------------------------


def _materialise_model(model: str, tmp: Path, input_shape: tuple[str, ...] = ()) -> tuple[Path, Any, str]:
    """The model file the planner reads, the model loaded here (checked runnable, inputs pinned) and its label."""
    import onnx

    from fleetpipe.models.shapes import parse_input_shapes
    from fleetpipe.models.source import open_model

    shapes = parse_input_shapes(input_shape) or None
    if Path(model).is_file():
        return Path(model), open_model(model, shapes), Path(model).stem
    from fleetpipe.models import zoo

    if model not in zoo.names():
        from fleetpipe.errors import UnsupportedModel

        raise UnsupportedModel(f"no such model file, and unknown zoo model {model!r} (zoo: {', '.join(zoo.names())})")
    kw = DEFAULT_MODEL_ARGS.get(model, {})
    try:
        proto = zoo.build(model, **kw)
    except KeyError as exc:
        raise UnsupportedModel(f"{exc.args[0]} (or a path to an .onnx file)") from exc
    path = tmp / f"{model}.onnx"
    onnx.save(proto, path)
    args = ",".join(f"{k}={v}" for k, v in kw.items())
    return path, open_model(proto, shapes, name=model), f"{model}({args})" if args else model


def _time_local(local: Any, x: dict[str, Any], runs: int = 5) -> float:
    local(x)
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        local(x)
        times.append((time.perf_counter() - t) * 1000)
    return float(sorted(times)[len(times) // 2])


def _wait_plan(client: Any, procs: list[subprocess.Popen[bytes]], logs: Path, timeout_s: float = 180.0) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for proc in procs:
            if proc.poll() is not None:
                raise RuntimeError(f"a fleet process exited early ({proc.args[3:5]}); logs in {logs}: "
                                   + _tail(logs))
        with contextlib.suppress(TimeoutError, Exception):
            return client.wait_plan(1.0)
    raise TimeoutError(f"no plan within {timeout_s} s; logs in {logs}: " + _tail(logs))


def _tail(logs: Path) -> str:
    parts = []
    for f in sorted(logs.glob("*.log")):
        lines = f.read_text(errors="replace").strip().splitlines()[-3:]
        if lines:
            parts.append(f"\n[{f.name}]\n" + "\n".join(lines))
    return "".join(parts)


def _stage_wire_bytes(graph: Any, plan: Any) -> dict[int, int]:
    """Bytes each stage sends per frame (its crossing tensors at the stage's bit-width)."""
    from fleetpipe.codec import encoded_nbytes

    out = {}
    for s in plan.stages:
        last = s.index == len(plan.stages) - 1
        total = 0
        for name in s.output_names:
            info = graph.tensors.get(name)
            if info is None:
                continue
            bits = 32 if last or not info.dtype.startswith("float") else s.bits
            total += encoded_nbytes(info.dtype, info.shape, bits)
        out[s.index] = total
    return out


def _node_compute_ms(results: list[Any]) -> dict[int, list[float]]:
    """Stage -> each replica's median compute per frame, from the results' hops."""
    import numpy as np

    per: dict[tuple[int, str], list[float]] = {}
    for r in results:
        for hop in r.hops:
            per.setdefault((int(hop.stage), hop.node_id), []).append(float(hop.compute_ms))
    out: dict[int, list[float]] = {}
    for (stage, _), v in sorted(per.items()):
        out.setdefault(stage, []).append(float(np.median(v)))
    return out


def _stage_rows(plan: Any, results: list[Any], wire_bytes: dict[int, int]) -> list[dict[str, Any]]:
    import numpy as np

    measured: dict[int, list[float]] = {}
    for r in results:
        for hop in r.hops:
            measured.setdefault(int(hop.stage), []).append(float(hop.compute_ms))
    rows = []
    for s in plan.stages:
        rows.append({
            "stage": s.index,
            "device": ", ".join(f"{n}" for n in s.nodes),
            "layers": f"{s.first_layer}-{s.last_layer}",
            "bits": 32 if s.index == len(plan.stages) - 1 else s.bits,
            "predicted_ms": float(s.predicted_ms),
            "measured_ms": float(np.median(measured.get(s.index, [float("nan")]))),
            "wire_bytes": int(wire_bytes.get(s.index, 0)),
        })
    return rows


def _wait_profiled(planner: subprocess.Popen[bytes], log: Path, timeout_s: float = 300.0) -> None:
    """Block until the planner logs that it profiled the model (it exits or times out: carry on)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and planner.poll() is None:
        with contextlib.suppress(OSError):
            if "planner: model " in log.read_text(errors="replace"):
                return
        time.sleep(0.05)


def _spawn(cmd: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    with open(log, "wb") as out:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)


@contextlib.contextmanager
def _stop_on_signals(stopped_by: list[int]) -> Iterator[None]:
    """SIGTERM and SIGINT both unwind the demo (KeyboardInterrupt), so every process and temp folder it made is
    cleaned up; further signals are ignored until that is done (the clean-up is bounded, see ``_processes``).
    Python's default SIGTERM kills the process on the spot and leaves the fleet running."""

    def handle(signum: int, _frame: Any) -> None:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.SIG_IGN)
        stopped_by.append(signum)
        raise KeyboardInterrupt

    previous = {sig: signal.signal(sig, handle) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


@contextlib.contextmanager
def _processes() -> Iterator[list[subprocess.Popen[bytes]]]:
    """Own a list of child processes: SIGTERM them all on exit, SIGKILL stragglers."""
    procs: list[subprocess.Popen[bytes]] = []
    try:
        yield procs
    finally:
        for proc in procs:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + 10
        for proc in procs:
            try:
                proc.wait(max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
