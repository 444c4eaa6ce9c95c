"""Every corpus model (tests/realmodels) through the front door: inspect, slice, plan, and a real emulated fleet.

    .venv/bin/python bench/realmodels.py [--only ID,ID] [--quick] [--frames N] [--nodes 3,4] [--out DIR] [--json]

One row per model: ``fleetpipe model inspect`` / ``model slice`` / ``fleetpipe plan`` / ``fleetpipe demo`` OK or
the first line of their error; the slices' max relative difference against the whole model (run by
onnxruntime or LiteRT directly, cuts at the quarters of the layer list); the bit-width the planner chose per cut
and the fleet's worst per-output relative L2 error at it; fleet throughput against the best single node of the
same fleet (the demo's baseline: the whole model on the fastest emulated device, measured in the same run) on a
3- and a 4-node emulated fleet (jetson-nano, rpi5, rpi4[, rpi4-wifi]: real processes, real mosquitto, compute
stretched and links paced per class). Negative models are expected to fail at inspect with a message naming
the cause; their row says whether they did.

Writes ``realmodels.md``, ``realmodels.json`` and ``realmodels.png`` (fleet/single throughput per model) to
``--out`` (default bench/out/realmodels). The corpus files come from ``scripts/fetch-models``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(REPO))

from _report import md_table  # noqa: E402

from tests.realmodels import corpus  # noqa: E402

# A representative subset for --quick: TFLite and ONNX, paddle2onnx, caffe2, torch exports, one negative.
QUICK = ("mp_face_detection_short", "mp_iris_landmark", "ppocr_cls_v2", "caffe2_squeezenet", "cnn_dyn_o11",
         "transformer_o17", "mp_face_landmark_attention")
FLEET_CLASSES = "jetson-nano,rpi5,rpi4,rpi4-wifi"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", default="", help="comma-separated corpus ids")
    p.add_argument("--quick", action="store_true", help=f"only {', '.join(QUICK)}; fewer frames")
    p.add_argument("--frames", type=int, default=None, help="frames streamed per fleet run (default 32, quick 16)")
    p.add_argument("--nodes", default="3,4", help="fleet sizes to run")
    p.add_argument("--no-fleet", action="store_true", help="inspect, slice and plan only")
    p.add_argument("--out", type=Path, default=BENCH / "out" / "realmodels")
    p.add_argument("--json", action="store_true", help="print the rows as JSON")
    args = p.parse_args(argv)
    models = corpus.corpus()
    if args.only:
        models = [corpus.by_id(i) for i in args.only.split(",") if i]
    elif args.quick:
        models = [corpus.by_id(i) for i in QUICK]
    missing = [m.id for m in models if not m.path.is_file()]
    if missing:
        raise SystemExit(f"missing corpus files {missing}: run .venv/bin/python scripts/fetch-models")
    frames = args.frames or (16 if args.quick else 32)
    sizes = [int(n) for n in args.nodes.split(",") if n]
    rows = []
    for m in models:
        t0 = time.monotonic()
        row = bench_model(m, frames=frames, sizes=[] if args.no_fleet else sizes)
        row["seconds"] = round(time.monotonic() - t0, 1)
        rows.append(row)
        print(f"{m.id}: {row['summary']} ({row['seconds']} s)", file=sys.stderr)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "realmodels.json").write_text(json.dumps(rows, indent=1) + "\n")
    md = markdown(rows, sizes)
    (args.out / "realmodels.md").write_text(md + "\n")
    with contextlib.suppress(Exception):  # the plot is a bonus (matplotlib may be missing)
        plot(rows, sizes, args.out / "realmodels.png")
    if args.json:
        print(json.dumps(rows, indent=1))
    else:
        print_table(rows, sizes)
        print(f"written: {args.out / 'realmodels.md'}, realmodels.json, realmodels.png")
    return 0


def bench_model(m: corpus.RealModel, *, frames: int, sizes: list[int]) -> dict[str, Any]:
    """One row: every step, stopping at the first that fails (a negative must fail at inspect)."""
    row: dict[str, Any] = {"id": m.id, "kind": m.kind, "exporter": m.exporter, "expected": m.expected}
    row["inspect"] = step_inspect(m)
    if m.expected == "negative":
        err = row["inspect"]
        named = err != "ok" and all(w in err for w in m.cause_words)
        row["summary"] = f"negative: {'fails naming the cause' if named else 'NOT rejected as expected'}: {err}"
        row["negative_ok"] = named
        return row
    if row["inspect"] != "ok":
        row["summary"] = f"inspect failed: {row['inspect']}"
        return row
    row["slice"], row["slice_max_rel_diff"], row["layers"], row["grouping"] = step_slice(m)
    row["plan"] = step_plan(m)
    if sizes:
        row["local_ms"] = local_ms(m)
    for n in sizes:
        row[f"fleet{n}"] = step_fleet(m, n, frames, row["local_ms"])
    row["summary"] = "; ".join(
        f"{k} {v if isinstance(v, str) else v.get('status')}" for k, v in row.items()
        if k in ("slice", "plan") or k.startswith("fleet")
    )
    return row


def step_inspect(m: corpus.RealModel) -> str:
    done = _fleetpipe(["model", "inspect", str(m.path), *m.shape_flags])
    return "ok" if done.returncode == 0 else _error_line(done)


def step_slice(m: corpus.RealModel) -> tuple[str, float | None, int | None, str]:
    """Slice at the quarters of the layer list (per node if blocks leave fewer than 3 layers); max rel diff."""
    with tempfile.TemporaryDirectory(prefix="fleetpipe-bench-") as tmp:
        base = Path(tmp)
        n, grouping = None, "blocks"
        for grouping in ("blocks", "nodes"):
            done = _fleetpipe(["model", "slice", str(m.path), *m.shape_flags, "--grouping", grouping,
                               "--cuts", "", "-o", str(base / grouping)])
            if done.returncode != 0:
                return _error_line(done), None, None, grouping
            n = json.loads((base / grouping / "manifest.json").read_text())["layers"]
            if n >= 3:
                break
        if n is None or n < 2:
            return f"only {n} layer(s): nothing to cut", None, n, grouping
        cuts = sorted({min(max(c, 0), n - 2) for c in (n // 4, n // 2, (3 * n) // 4)})
        out = base / "cut"
        done = _fleetpipe(["model", "slice", str(m.path), *m.shape_flags, "--grouping", grouping,
                           "--cuts", ",".join(map(str, cuts)), "-o", str(out)])
        if done.returncode != 0:
            return _error_line(done), None, n, grouping
        feeds = corpus.random_inputs(corpus.model_input_specs(m))
        want = corpus.run_file(m.kind, m.path, feeds)
        try:
            got = corpus.run_stages(m.kind, out, feeds)
            worst = max(corpus.rel_diff(got[k], v) for k, v in want.items())
        except (AssertionError, KeyError, RuntimeError, ValueError) as exc:
            return f"stages do not run: {str(exc).splitlines()[0][:160]}", None, n, grouping
        status = "ok" if worst <= corpus.SLICE_REL_TOL else f"differs ({worst:.2g})"
        return status, worst, n, grouping


def step_plan(m: corpus.RealModel) -> str:
    """``fleetpipe plan`` for the 4-device fleet file (offline: profiled on this host, scaled per class)."""
    with tempfile.TemporaryDirectory(prefix="fleetpipe-bench-") as tmp:
        fleet = Path(tmp) / "fleet.toml"
        fleet.write_text("".join(f'[[device]]\nname = "{c}-{i}"\nclass = "{c}"\n\n'
                                 for i, c in enumerate(FLEET_CLASSES.split(","))))
        done = _fleetpipe(["plan", "--model", str(m.path), "--fleet", str(fleet), "--json", *m.shape_flags],
                          timeout=300)
    return "ok" if done.returncode == 0 else _error_line(done)


def local_ms(m: corpus.RealModel, runs: int = 15) -> float:
    """Median time of the whole model here (one thread, as a node runs it), before any fleet process starts."""
    feeds = corpus.random_inputs(corpus.model_input_specs(m))
    run = corpus.runner(m.kind, m.path)
    run(feeds)
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        run(feeds)
        times.append((time.perf_counter() - t) * 1000)
    return float(sorted(times)[len(times) // 2])


def step_fleet(m: corpus.RealModel, nodes: int, frames: int, whole_ms: float) -> dict[str, Any]:
    """``fleetpipe demo --model FILE --json`` on ``nodes`` emulated nodes: bits per cut, error, fps ratio.

    The baseline is the best single node of that fleet: the whole model's time here (``local_ms``, measured
    on a quiet host before the fleet starts) times the fastest class's compute factor. The demo's own
    ``single_fps`` is kept too; it is timed while the fleet's processes run and swings run to run.
    """
    from fleetpipe.node.emulate import parse_emulate

    args = ["demo", "--model", str(m.path), "--nodes", str(nodes), "--classes", FLEET_CLASSES,
            "--frames", str(frames), "--json", *m.shape_flags]
    done = _fleetpipe(args, timeout=600)
    try:
        rep = json.loads(done.stdout)
    except json.JSONDecodeError:
        return {"status": _error_line(done)}
    stages = rep.get("stages", [])
    out = {
        "status": "ok" if done.returncode == 0 else ("accuracy over tolerance" if rep else _error_line(done)),
        "stages": len(stages),
        "bits": [s["bits"] for s in stages[:-1]],
        "rel_error": rep.get("max_rel_error"),
        "tolerance": rep.get("tolerance"),
        "fleet_fps": rep.get("fleet_fps"),
        "single_fps": rep.get("single_fps"),
        "best_single_node": rep.get("best_single_node"),
        "plan_s": rep.get("plan_s"),
    }
    factor = min(parse_emulate(c).compute_factor for c in FLEET_CLASSES.split(",")[:nodes])
    out["baseline_fps"] = 1000.0 / (whole_ms * factor)
    if out["fleet_fps"]:
        out["ratio"] = out["fleet_fps"] / out["baseline_fps"]
    return out


def markdown(rows: list[dict[str, Any]], sizes: list[int]) -> str:
    headers = ["model", "kind", "exporter", "inspect", "slice", "max rel diff", "plan"]
    for n in sizes:
        headers += [f"{n} nodes", f"bits/cut ({n})", f"rel err ({n})", f"fleet/single ({n})"]
    body = []
    for r in rows:
        if r["expected"] == "negative":
            cells = [r["id"], r["kind"], r["exporter"], ("rejected: " if r.get("negative_ok") else "NOT rejected: ")
                     + r["inspect"], "-", None, "-"]
            body.append(cells + ["-", "-", None, None] * len(sizes))
            continue
        rel = r.get("slice_max_rel_diff")
        cells = [r["id"], r["kind"], r["exporter"], r["inspect"], r.get("slice", "-"),
                 "-" if rel is None else f"{rel:.2g}", r.get("plan", "-")]
        for n in sizes:
            f = r.get(f"fleet{n}") or {}
            err = f.get("rel_error")
            cells += [f.get("status", "-"), ",".join(map(str, f.get("bits", []))) or "-",
                      "-" if err is None else f"{err:.2g}",
                      f"{f['ratio']:.2f}x" if f.get("ratio") else None]
        body.append(cells)
    return md_table(headers, body, digits=4)


def print_table(rows: list[dict[str, Any]], sizes: list[int]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="real models through the front door")
    for col in ("model", "inspect", "slice", "rel diff", "plan", *[f"fleet {n}: bits / err / x" for n in sizes]):
        table.add_column(col, overflow="fold")
    for r in rows:
        if r["expected"] == "negative":
            table.add_row(r["id"], ("[green]rejected[/] " if r.get("negative_ok") else "[red]NOT rejected[/] ")
                          + r["inspect"], "-", "-", "-", *["-"] * len(sizes))
            continue
        rel = r.get("slice_max_rel_diff")
        fleets = []
        for n in sizes:
            f = r.get(f"fleet{n}") or {}
            if f.get("status") == "ok" or f.get("ratio"):
                fleets.append(f"{','.join(map(str, f.get('bits', [])))} / {f.get('rel_error', 0):.3g} / "
                              f"{f.get('ratio', 0):.2f}x" + ("" if f.get("status") == "ok" else f" ({f['status']})"))
            else:
                fleets.append(str(f.get("status", "-")))
        table.add_row(r["id"], _mark(r["inspect"]), _mark(r.get("slice", "-")),
                      "-" if rel is None else f"{rel:.2g}", _mark(r.get("plan", "-")), *fleets)
    Console(width=200).print(table)


def plot(rows: list[dict[str, Any]], sizes: list[int], path: Path) -> None:
    runnable = [r for r in rows if r["expected"] == "runnable" and any(r.get(f"fleet{n}") for n in sizes)]
    if not runnable:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(8.0, 0.45 * len(runnable) * len(sizes)), 4.8), dpi=110)
    width = 0.8 / len(sizes)
    for k, n in enumerate(sizes):
        ys = [(r.get(f"fleet{n}") or {}).get("ratio") or float("nan") for r in runnable]
        ax.bar([i + (k - (len(sizes) - 1) / 2) * width for i in range(len(runnable))], ys, width, label=f"{n} nodes")
    ax.axhline(1.0, color="grey", linestyle="--", linewidth=1)
    ax.set_yscale("log")
    ax.set_xticks(range(len(runnable)))
    ax.set_xticklabels([r["id"] for r in runnable], rotation=60, ha="right", fontsize=8)
    ax.set_ylabel("fleet / best single node (log)")
    ax.set_title("fleet throughput against the best single node, per corpus model")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _mark(status: str) -> str:
    return "[green]ok[/]" if status == "ok" else f"[red]{status}[/]"


def _fleetpipe(args: list[str], timeout: float = 180) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "NO_COLOR": "1", "COLUMNS": "200", "OMP_NUM_THREADS": "1"}
    try:
        return subprocess.run([sys.executable, "-m", "fleetpipe", *args], capture_output=True, text=True,
                              timeout=timeout, env=env)
    except subprocess.TimeoutExpired as exc:
        return subprocess.CompletedProcess(exc.cmd, 124, "", f"timed out after {timeout:.0f} s")


def _error_line(done: subprocess.CompletedProcess[str]) -> str:
    """The line that says what went wrong (the CLI's error line, else the last line of stderr)."""
    lines = [ln.strip() for ln in (done.stderr or "").splitlines() if ln.strip()]
    for ln in reversed(lines):
        if "error" in ln.lower() and not ln.startswith("File "):
            return ln[:300]
    return (lines[-1] if lines else f"exit {done.returncode}")[:300]


if __name__ == "__main__":
    sys.exit(main())
