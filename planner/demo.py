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
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"zoo model (default {DEFAULT_MODEL}) or an .onnx file")
    p.add_argument("--nodes", type=int, default=len(DEFAULT_CLASSES), help="number of emulated nodes")
    p.add_argument("--classes", default=",".join(DEFAULT_CLASSES),
                   help="device classes, cycled over the nodes (rpi3, rpi4, rpi4-wifi, rpi5, jetson-nano, x86, 2.5, "
                   "...)")
    p.add_argument("--frames", type=int, default=48, help="frames to stream")
    p.add_argument("--window", type=int, default=None, help="frames in flight (default: 3 per node)")
    p.add_argument("--bits", type=int, default=8, help="activation bit-width between stages")
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
    top1_agreement: float
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

    def as_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict (without the raw results)."""
        return {k: getattr(self, k) for k in self.__dataclass_fields__ if k != "results"}


def run(args: argparse.Namespace) -> int:
    """CLI entry: run the demo and print a table (or JSON)."""
    from rich.console import Console

    console = Console(stderr=args.json)
    classes = [c.strip() for c in args.classes.split(",") if c.strip()]
    if args.plot:
        import matplotlib  # noqa: F401 - the plot extra: fail now, not after the whole run
    stopped_by: list[int] = []
    try:
        with _stop_on_signals(stopped_by):
            report = run_demo(model=args.model, nodes=args.nodes, classes=classes, frames=args.frames,
                              window=args.window, bits=args.bits, console=console, log_dir=args.keep_logs,
                              plot=args.plot)
    except KeyboardInterrupt:
        console.print("[yellow]interrupted; fleet stopped[/]")
        return 128 + (stopped_by[0] if stopped_by else signal.SIGINT)
    if args.json:
        print(json.dumps(report.as_dict(), indent=1))
    else:
        print_report(report, console)
    return 0 if report.top1_agreement >= 0.9 else 1


def run_demo(*, model: str = DEFAULT_MODEL, nodes: int = 4, classes: list[str] | None = None, frames: int = 48,
             window: int | None = None, bits: int = 8, console: Any = None, log_dir: str | None = None,
             plot: str | None = None, fleet: str | None = None) -> DemoReport:
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
        model_path, input_shape, model_name = _materialise_model(model, tmp)
        broker = stack.enter_context(LocalBroker())
        console.print(f"[bold]fleetpipe demo[/]: mosquitto on {broker.url}, fleet {fleet}, model {model_name}, "
                      f"{nodes} nodes ({', '.join(classes[i % len(classes)] for i in range(nodes))})")
        console.print(f"watch it from another terminal: fleetpipe top --broker {broker.url} --fleet {fleet}")
        procs = stack.enter_context(_processes())
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
        base = [sys.executable, "-m", "fleetpipe"]
        t0 = time.monotonic()
        procs.append(_spawn([*base, "-v", "planner", "--broker", broker.url, "--model", str(model_path), "--fleet",
                             fleet, "--expect-nodes", str(nodes), "--bits", str(bits), "--interface", "127.0.0.1"],
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

        rng = np.random.default_rng(0)
        inputs = [rng.standard_normal(input_shape).astype(np.float32) for _ in range(max(frames, 4))]
        session = _local_session(model_path)
        reference = [session.run(None, {session.get_inputs()[0].name: x})[0] for x in inputs]
        whole_ms = _time_local(session, inputs[0])

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

        outs = [r.output for r in results]
        agree = float(np.mean([np.argmax(o) == np.argmax(ref) for o, ref in zip(outs, reference, strict=False)]))
        rel = float(max(np.linalg.norm(o - ref) / max(np.linalg.norm(ref), 1e-12)
                        for o, ref in zip(outs, reference, strict=False)))
        stages = _stage_rows(plan, results, _stage_wire_bytes(model_path, input_shape, plan))
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
            top1_agreement=agree, max_rel_error=rel, resent=client.stats.resent,
            duplicates=client.stats.duplicates, plan_s=plan_s, results=results, wall_fps=len(results) / wall,
            calibrated_fps=1000.0 / period if period else 0.0, node_classes=node_classes)
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
    console.print(f"outputs vs whole model run locally: top-1 agreement {100 * report.top1_agreement:.1f}%, "
                  f"max relative L2 error {report.max_rel_error:.4f} ({report.frames} frames, "
                  f"{report.resent} re-sent, {report.duplicates} duplicate results dropped); "
                  f"fleet up and planned in {report.plan_s:.1f} s")


# -- helpers -------------------------------------------------------------------------------------


def _materialise_model(model: str, tmp: Path) -> tuple[Path, tuple[int, ...], str]:
    import onnx

    from fleetpipe.errors import UnsupportedModel
    from fleetpipe.models.onnx_graph import read_model

    if model.endswith(".onnx"):
        proto = read_model(model)  # UnsupportedModel: missing or not an ONNX model
        dims = tuple(d.dim_value or 1 for d in proto.graph.input[0].type.tensor_type.shape.dim)
        return Path(model), dims, Path(model).stem
    from fleetpipe.models import zoo

    kw = DEFAULT_MODEL_ARGS.get(model, {})
    try:
        proto = zoo.build(model, **kw)
    except KeyError as exc:
        raise UnsupportedModel(f"{exc.args[0]} (or a path to an .onnx file)") from exc
    path = tmp / f"{model}.onnx"
    onnx.save(proto, path)
    args = ",".join(f"{k}={v}" for k, v in kw.items())
    return path, tuple(zoo.input_shape(model, **kw)), f"{model}({args})" if args else model


def _local_session(path: Path) -> Any:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def _time_local(session: Any, x: Any, runs: int = 5) -> float:
    name = session.get_inputs()[0].name
    session.run(None, {name: x})
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        session.run(None, {name: x})
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


def _stage_wire_bytes(model_path: Path, input_shape: tuple[int, ...], plan: Any) -> dict[int, int]:
    """Bytes each stage sends per frame (its crossing tensors at the stage's bit-width)."""
    from fleetpipe.codec import encoded_nbytes
    from fleetpipe.models.onnx_graph import load_onnx, read_model

    proto = read_model(str(model_path))
    graph = load_onnx(proto, input_shapes={proto.graph.input[0].name: input_shape})
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
