"""Run every bench script and write one Markdown report with tables and plots.

    .venv/bin/python bench/run_all.py [--quick] [--out results/DIR] [--only NAME,...] [--skip NAME,...]

Each script runs as its own subprocess (``--json`` where it has one, per-script timeout). A script that fails or
times out is recorded as failed with the tail of its stderr, and the suite goes on. Written to the output folder
(default ``results/<timestamp>[-quick]``): ``report.md`` (machine details, headline tables, plots), ``*.png``,
``results.json`` (everything parsed) and ``logs/<script>.{stdout,stderr}``.

Every headline figure is a ratio against a baseline measured in the same run (np.copy for the codec, raw TCP
for MQTT, the optimum for planner baselines, one device for fleets). ``--quick`` picks small parameters per
script so the whole suite fits in 10 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _report import machine_details, md_table, plot_bars, plot_lines

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent

__all__ = ["main"]


@dataclass
class Spec:
    """One bench script: its arguments (full / quick), timeouts and how its output is read."""

    name: str
    full: list[str]
    quick: list[str]
    timeout_full: float
    timeout_quick: float
    output: str = "text"  # "json" (stdout), "file" (--json OUT written by the script) or "text"
    what: str = ""


SPECS = [
    Spec("codec", ["--json"], ["--json", "--repeat", "3"], 600, 90, "json",
         "tensor codec encode/decode throughput as a ratio to np.copy"),
    Spec("planner", ["--json", "{out}/planner.json"], ["--quick", "--time-limit", "2", "--json", "{out}/planner.json"],
         900, 150, "file", "exact solver time and baselines' bottleneck / optimum"),
    Spec("slicing", [], ["--quick"], 300, 90, "text", "model cut into slices vs the whole model"),
    Spec("discovery", [], ["--rounds", "2"], 120, 60, "text", "mDNS discovery vs static URL"),
    Spec("adaptive_sim", [], ["--seconds", "4"], 300, 120, "text", "adaptive bits + re-plan vs fixed (simulation)"),
    Spec("transport", [], ["--quick"], 600, 150, "text", "MQTT (QoS 1 via mosquitto) vs raw TCP loopback"),
    Spec("intra", [], ["--quick", "--skip-estimator"], 900, 150, "text",
         "intra-layer splits vs pipeline only; learned cost estimator"),
    Spec("pipeline", ["--json"], ["--json", "--frames", "32"], 900, 240, "json",
         "4-node emulated fleet vs best single node vs planner prediction; per-hop MQTT vs raw TCP"),
    Spec("faults", ["--json", "--runs", "5"], ["--json", "--runs", "1", "--warmup", "3"], 900, 120, "json",
         "kill -9 of a middle node mid-stream at the default timing (health interval 1 s)"),
    Spec("adaptive", ["--json"], ["--json", "--phase-s", "2.5"], 600, 150, "json",
         "real fleet: adaptive bits + fine-tune vs fixed 8-bit plan"),
    Spec("early_exit", [], ["--repeat", "1"], 300, 120, "text",
         "COACH early exit: exit ratio on correlated vs shuffled streams, accuracy, throughput vs no exit"),
    Spec("scale", ["--json"], ["--json", "--quick"], 1800, 330, "json",
         "EdgePipe metric: 16-device ViT fleet / one device; 8-device CNN fleets"),
]


@dataclass
class Outcome:
    name: str
    status: str  # ok | failed | timeout
    seconds: float
    returncode: int | None
    data: Any = None
    stdout: str = ""
    stderr_tail: str = ""
    parse_error: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


# -- running ----------------------------------------------------------------------------------------


def _descendants(root: int) -> list[int]:
    parent: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                raw = Path(f"/proc/{entry}/stat").read_text(errors="replace")
                parent[int(entry)] = int(raw[raw.rfind(")") + 2 :].split()[1])
            except (OSError, ValueError, IndexError):
                continue
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        kids = [p for p, pp in parent.items() if pp == pid]
        out.extend(kids)
        todo.extend(kids)
    return out


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """Interrupt a timed-out script so its own cleanup stops its fleet; then kill what it started, by pid."""
    tree = _descendants(proc.pid)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGINT)
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    time.sleep(0.5)
    for pid in tree:  # fleet processes run in their own sessions; they are ours, kill leftovers by pid
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)


def run_one(spec: Spec, quick: bool, out: Path, on_tick: Callable[[], None]) -> Outcome:
    args = [a.replace("{out}", str(out)) for a in (spec.quick if quick else spec.full)]
    timeout = spec.timeout_quick if quick else spec.timeout_full
    logs = out / "logs"
    stdout_path, stderr_path = logs / f"{spec.name}.stdout", logs / f"{spec.name}.stderr"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "COLUMNS": "160", "TERM": "dumb"}
    t0 = time.monotonic()
    with open(stdout_path, "wb") as so, open(stderr_path, "wb") as se:
        proc = subprocess.Popen([sys.executable, str(BENCH / f"{spec.name}.py"), *args], cwd=REPO, stdout=so,
                                stderr=se, env=env, start_new_session=True)
        status = "ok"
        while True:
            try:
                proc.wait(0.5)
                break
            except subprocess.TimeoutExpired:
                on_tick()
                if time.monotonic() - t0 > timeout:
                    _stop(proc)
                    status = "timeout"
                    break
    seconds = time.monotonic() - t0
    stdout = stdout_path.read_text(errors="replace")
    stderr = stderr_path.read_text(errors="replace")
    tail = "\n".join(stderr.strip().splitlines()[-15:])
    if status == "ok" and proc.returncode != 0:
        status = "failed"
    outcome = Outcome(spec.name, status, seconds, proc.returncode, stdout=stdout, stderr_tail=tail)
    try:
        if spec.output == "json":
            outcome.data = json.loads(stdout[stdout.index("{"):]) if "{" in stdout else None
        elif spec.output == "file":
            outcome.data = json.loads((out / f"{spec.name}.json").read_text())
        else:
            outcome.data = PARSERS.get(spec.name, lambda s: None)(stdout)
    except Exception as exc:
        outcome.parse_error = f"{type(exc).__name__}: {exc}"
        if outcome.status == "ok":
            outcome.status = "failed"
    return outcome


# -- text parsers -----------------------------------------------------------------------------------

_SIZE = {"KB": 1024, "MB": 1024 * 1024}


def parse_transport(text: str) -> dict[str, Any]:
    rows = []
    pat = re.compile(r"^\s*(\d+) (KB|MB) \|\s*([\d.]+) ms\s+([\d.]+) ms\s+[\d.]+x \|\s*([\d.]+) MB/s\s+([\d.]+) MB/s")
    for line in text.splitlines():
        m = pat.match(line)
        if m:
            size = int(m[1]) * _SIZE[m[2]]
            mr, rr, mt, rt = (float(m[i]) for i in range(3, 7))
            rows.append({"payload": f"{m[1]} {m[2]}", "bytes": size, "mqtt_rtt_ms": mr, "raw_rtt_ms": rr,
                         "rtt_ratio": mr / rr, "mqtt_mbs": mt, "raw_mbs": rt, "tput_ratio": mt / rt})
    extra = [ln.strip() for ln in text.splitlines() if ln.startswith(("TCP_NODELAY", "mallopt"))]
    if not rows:
        raise ValueError("no transport rows in the output")
    return {"rows": rows, "notes": extra}


def parse_slicing(text: str) -> dict[str, Any]:
    m = re.search(r"whole model\s+([\d.]+) ms", text)
    n = re.search(r"slices seq\.\s+([\d.]+) ms", text)
    r = re.search(r"ratio \(slices / whole\): ([\d.]+)", text)
    if not (m and n and r):
        raise ValueError("no slicing figures in the output")
    out = {"whole_ms": float(m[1]), "slices_ms": float(n[1]), "ratio": float(r[1]),
           "model": text.splitlines()[0] if text else ""}
    tw = re.search(r"tflite whole\s+([\d.]+) ms", text)
    tn = re.search(r"tflite \d+ slices\s+([\d.]+) ms", text)
    tr = re.search(r"\(tflite slices / tflite whole\): ([\d.]+)", text)
    if tw and tn and tr:
        out.update(tflite_whole_ms=float(tw[1]), tflite_slices_ms=float(tn[1]), tflite_ratio=float(tr[1]))
    return out


def parse_discovery(text: str) -> dict[str, Any]:
    vals = {k: float(v) for k, v in re.findall(r"(cold|warm|static)[^\n]*?([\d.]+) ms", text)}
    if len(vals) < 3:
        raise ValueError("no discovery figures in the output")
    return {**vals, "cold_vs_static": vals["cold"] / vals["static"], "warm_vs_static": vals["warm"] / vals["static"]}


def parse_adaptive_sim(text: str) -> dict[str, Any]:
    rows = []
    for line in text.splitlines():
        m = re.match(r"^(fixed plan, 8-bit|adaptive bits \+ re-plan)\s+(\d+)\s+([\d.]+)\s+([\d.]+)\s+(-?[\d.]+)%", line)
        if m:
            rows.append({"policy": m[1], "frames": int(m[2]), "fps": float(m[3]), "kb_per_frame": float(m[4]),
                         "acc_loss_pct": float(m[5])})
    r = re.search(r"throughput ratio adaptive / fixed: ([\d.]+)x", text)
    if not r:
        raise ValueError("no adaptive_sim ratio in the output")
    return {"rows": rows, "throughput_ratio": float(r[1])}


def parse_text_only(text: str) -> dict[str, Any]:
    return {"text": text}


PARSERS: dict[str, Callable[[str], Any]] = {"transport": parse_transport, "slicing": parse_slicing,
                                            "discovery": parse_discovery, "adaptive_sim": parse_adaptive_sim,
                                            "intra": parse_text_only, "early_exit": parse_text_only}


# -- report sections --------------------------------------------------------------------------------


def _num(v: Any) -> float | None:
    return float(v) if isinstance(v, int | float) and not isinstance(v, bool) else None


def section_planner(rows: list[dict[str, Any]], out: Path) -> tuple[str, list[str]]:
    cols = ["devices", "layers", "seed", "solve_s", "exact", "gap", "stages", "heuristic", "even", "neurosurgeon",
            "memory"]
    md = ["Bottleneck of each method / the exact solver's bottleneck (1.00 = optimal; `mem!` = a stage does "
          "not fit in memory), exact solver wall time on generated fleets.", "",
          md_table(cols, [[r.get(c) for c in cols] for r in rows], 3)]
    devs = sorted({r["devices"] for r in rows})
    by = {d: [r for r in rows if r["devices"] == d] for d in devs}
    plots = [plot_lines(out / "planner_solve_time.png", "exact planner: solve time vs fleet size", "devices",
                        "solve time (s, median over cases)",
                        {"exact": (devs, [statistics.median(r["solve_s"] for r in by[d]) for d in devs]),
                         "heuristic": (devs, [statistics.median(r["heuristic_ms"] / 1000 for r in by[d])
                                              for d in devs])},
                        logx=True, logy=True).name]
    series = {}
    for m in ("heuristic", "even", "neurosurgeon", "memory"):
        vals: list[float | None] = []
        for d in devs:
            xs = [_num(r.get(m)) for r in by[d]]
            xs2 = [x for x in xs if x is not None]
            vals.append(statistics.median(xs2) if xs2 else None)
        series[m] = vals
    plots.append(plot_bars(out / "planner_baselines.png", "bottleneck / optimum (1 = optimal; missing = infeasible)",
                           "ratio to exact", [f"{d} dev" for d in devs], series, hline=1.0).name)
    return "\n".join(md), plots


def section_pipeline(d: dict[str, Any], scale: dict[str, Any] | None, out: Path) -> tuple[str, list[str]]:
    md = [f"Model {d['model']}; 4 emulated nodes vs a 1-node fleet of the best class ({d['single_node_class']}) over "
          "the same MQTT path, both measured in this run.", "",
          md_table(["", "fleet", "best single", "ratio"], [
              ["throughput frames/s", d["fleet_fps"], d["single_node_fps"], f"{d['fleet_vs_single']:.2f}x"],
              ["latency ms (one frame)", d["fleet_latency_ms"], d["single_latency_ms"],
               f"{d['fleet_latency_ms'] / d['single_latency_ms']:.2f}x"],
              ["planner prediction frames/s", d["predicted_fps"], "",
               f"measured/predicted {d['measured_vs_predicted']:.2f}"],
              *([["plan re-scored with measured compute frames/s", d["calibrated_fps"], "",
                  f"measured/calibrated {d['measured_vs_calibrated']:.2f}"]] if d.get("calibrated_fps") else [])]),
          "",
          "Per stage (utilisation = stage compute ms x fleet frames/s / 1000):", "",
          md_table(["stage", "device", "layers", "bits", "predicted ms", "measured ms", "utilisation", "wire bytes"],
                   [[s["stage"], s["device"], s["layers"], s["bits"], s["predicted_ms"], s["measured_ms"],
                     s["measured_ms"] * d["fleet_fps"] / 1000, s["wire_bytes"]] for s in d["stages"]]), "",
          "Per hop: MQTT (publish -> next node receives, from hop timestamps) vs raw TCP one-way, same payload:", "",
          md_table(["payload bytes", "MQTT hop ms", "raw TCP ms", "MQTT / raw"],
                   [[h["payload_bytes"], h["mqtt_hop_ms"], h["raw_tcp_ms"], f"{h['ratio']:.1f}x"] for h in d["hops"]])]
    groups = ["resnet50 x4"]
    fleet, single, pred = [d["fleet_fps"]], [d["single_node_fps"]], [d["predicted_fps"]]
    if scale:
        for m in scale.get("fleet8", []):
            if "error" not in m:
                groups.append(f"{m['model'].split('(')[0]} x8")
                fleet.append(m["fleet_fps"])
                single.append(m["local_single_fps"])
                pred.append(m["predicted_fps"])
        if "measured16" in scale:
            e = scale["edgepipe"]
            groups.append("vit x16")
            fleet.append(e["measured_fleet_fps"])
            single.append(e["measured_single_fps"])
            pred.append(e["runtime_predicted_fps"])
    plots = [plot_bars(out / "pipeline_throughput.png", "fleet vs best single device vs planner prediction",
                       "frames/s (log)", groups, {"fleet (measured)": fleet, "single device": single,
                                                  "planner predicted": pred}, logy=True).name]
    return "\n".join(md), plots


def section_scale(d: dict[str, Any], out: Path) -> tuple[str, list[str]]:
    e = d["edgepipe"]
    factors = ", ".join(sorted(set(d["classes16"]), key=float))
    md = [f"ViT {d['vit']} = {e['layers']} fleetpipe layers on 16 emulated devices ({factors}x "
          f"slower than this host); one device = the best class ({e['best_single_class']}x). "
          "EdgePipe reports up to **10.59x** on 16 devices (ViT-Large).", ""]
    rows = [["predicted (planner cost model, fleetfile + partition.solve)", e["predicted_fleet_fps"],
             e["predicted_single_fps"], f"{e['predicted_speedup']:.2f}x"]]
    if "measured_speedup" in e:
        rows.append([f"measured (run_demo, 16 node processes; one device: {e['single_baseline']})",
                     e["measured_fleet_fps"], e["measured_single_fps"], f"**{e['measured_speedup']:.2f}x**"])
        rows.append(["runtime plan's own prediction", e["runtime_predicted_fps"], "",
                     f"measured/predicted {e['measured_vs_predicted']:.2f}"])
    md.append(md_table(["", "fleet frames/s", "one device frames/s", "speedup (fleet / one device)"], rows))
    pr = d["predicted"]["rows"]
    md += ["", "Predicted speedup vs fleet size:", "",
           md_table(["devices", "stages", "bottleneck ms", "speedup", "solve s", "exact"],
                    [[r["devices"], r["stages"], r["bottleneck_ms"], f"{r['speedup']:.2f}x", r["solve_s"], r["exact"]]
                     for r in pr])]
    for key in ("measured16", "measured1"):
        if key in d:
            m = d[key]
            h = m.get("host", {})
            md += ["", f"`{key}`: {m['frames']} frames, {m['fleet_fps']:.2f} frames/s, top-1 agreement with the whole "
                       f"model {m['top1_agreement']:.2f}, {m['resent']} re-sent; this process tree (fleet + broker + "
                       f"client) used {h.get('mean_cores')} cores on average (peak {h.get('peak_cores_5s')} over 5 s), "
                       f"peak RSS {h.get('peak_rss_mb')} MB over {h.get('max_procs')} processes; stage utilisation "
                       f"min {m['min_util']:.2f} / mean {m['mean_util']:.2f}."]
    if "measured16" in d:
        m = d["measured16"]
        md += ["", "16-device stages (utilisation = busy fraction of the measured period):", "",
               md_table(["stage", "device", "layers", "predicted ms", "measured ms", "utilisation"],
                        [[s["stage"], s["device"], s["layers"], s["predicted_ms"], s["measured_ms"], s["util"]]
                         for s in m["stages"]])]
    f8 = d.get("fleet8") or []
    if f8:
        md += ["", "8 emulated devices (classes " + ", ".join(d["classes8"][:4]) + " x slower, twice); one device = "
               "whole model timed on this host x the best factor:", "",
               md_table(["model", "measured fps", "predicted fps", "measured / predicted", "fleet / one device",
                         "stage util min", "mean", "bytes/frame between stages (8-bit)", "same at float32",
                         "cores used"],
                        [[m["model"], "failed", m["error"][:80], "", "", "", "", "", "", ""] if "error" in m else
                         [m["model"], m["fleet_fps"], m["predicted_fps"], m["measured_vs_predicted"],
                          f"{m['fleet_fps'] / m['local_single_fps']:.2f}x", m["min_util"], m["mean_util"],
                          m["bytes"]["between_stages_bytes"], m["bytes"]["float32_bytes"],
                          m["host"].get("mean_cores")] for m in f8])]
    points = {}
    if "measured_speedup" in e:
        points["measured (16 devices)"] = ([16], [e["measured_speedup"]])
    plots = [plot_lines(out / "scale_speedup.png", "ViT: fleet / one device (EdgePipe metric)", "devices",
                        "speedup vs best single device",
                        {"predicted": ([r["devices"] for r in pr], [r["speedup"] for r in pr]),
                         "linear": ([r["devices"] for r in pr], [float(r["devices"]) for r in pr])},
                        logx=True, points=points).name]
    return "\n".join(md), plots


def section_transport(d: dict[str, Any], out: Path) -> tuple[str, list[str]]:
    rows = d["rows"]
    md = ["Ping-pong: MQTT = 4 socket hops via the broker (QoS 1), raw = 2 hops; throughput one-way. Ratio > 1 "
          "means MQTT is slower (rtt) / < 1 means MQTT moves fewer bytes (throughput).", "",
          md_table(["payload", "MQTT rtt ms", "raw rtt ms", "rtt MQTT / raw", "MQTT MB/s", "raw MB/s",
                    "tput MQTT / raw"],
                   [[r["payload"], r["mqtt_rtt_ms"], r["raw_rtt_ms"], f"{r['rtt_ratio']:.1f}x", r["mqtt_mbs"],
                     r["raw_mbs"], f"{r['tput_ratio']:.2f}x"] for r in rows], 3)]
    md += [""] + [f"- {n}" for n in d.get("notes", [])]
    xs = [r["bytes"] / 1024 for r in rows]
    plots = [plot_lines(out / "transport_ratio.png", "MQTT / raw TCP loopback vs payload size", "payload (KB, log2)",
                        "ratio", {"round trip MQTT / raw (higher = slower)": (xs, [r["rtt_ratio"] for r in rows]),
                                  "throughput MQTT / raw (lower = slower)": (xs, [r["tput_ratio"] for r in rows])},
                        logx=True, logy=True, hline=1.0).name]
    return "\n".join(md), plots


def section_codec(d: dict[str, Any], out: Path) -> tuple[str, list[str]]:
    rows = d["rows"]
    bits = sorted({r["bits"] for r in rows})
    per = {b: [r for r in rows if r["bits"] == b] for b in bits}

    def med(b: int, key: str) -> float | None:
        xs = [_num(r.get(key)) for r in per[b]]
        xs2 = [x for x in xs if x is not None]
        return statistics.median(xs2) if xs2 else None

    md = [f"Encode / decode throughput as a multiple of np.copy of the same array (median over {len(per[bits[0]])} "
          f"shapes), numba kernels {'on' if d.get('numba') else 'off'}; targets {d.get('targets')}, "
          f"met: {d.get('met')}.",
          "", md_table(["bits", "encode x copy", "decode x copy", "compression", "rel L2 error"],
                       [[b, med(b, "enc_x_copy"), med(b, "dec_x_copy"), med(b, "compression"), med(b, "rel_l2")]
                        for b in bits], 3)]
    plots = [plot_bars(out / "codec_ratios.png", "codec throughput / np.copy per bit-width (median over shapes)",
                       "x np.copy", [f"{b}-bit" for b in bits],
                       {"encode": [med(b, "enc_x_copy") for b in bits], "decode": [med(b, "dec_x_copy") for b in bits]})
             .name]
    return "\n".join(md), plots


def section_faults(d: dict[str, Any]) -> str:
    hs = d["health_interval_s"]
    return md_table(["runs", "kill -> new plan s", "kill -> restored s", "restored / health interval",
                     "restored p95 / interval", "re-plan own ms", "lost", "duplicated"],
                    [[len(d["runs"]), d["replan_s_median"], d["restored_s_median"], d["restored_s_median"] / hs,
                      d.get("restored_intervals_p95", float("nan")), d.get("replan_own_ms_median", float("nan")),
                      d["lost_total"], d["duplicated_total"]]])


def section_adaptive(d: dict[str, Any]) -> str:
    f, a = d["fixed"], d["adaptive"]
    rows = [[k + 1, mbps, f["fps"][k], a["fps"][k], f"{a['fps'][k] / max(f['fps'][k], 1e-9):.2f}x",
             f["bytes_per_frame"][k], a["bytes_per_frame"][k]] for k, mbps in enumerate(d["phases_mbps"])]
    return "\n".join([
        md_table(["phase", "link Mbit/s", "fixed fps", "adaptive fps", "adaptive / fixed", "fixed B/frame",
                  "adaptive B/frame"], rows, 1), "",
        f"Overall throughput adaptive / fixed **{d['throughput_ratio']:.2f}x**; accuracy on real labels: float "
        f"{d['float_accuracy']:.4f}, fixed 8-bit {f['accuracy']:.4f}, adaptive {a['accuracy']:.4f}; frames lost "
        f"fixed {f['lost']}, adaptive {a['lost']}."])


def section_simple(name: str, d: dict[str, Any]) -> str:
    if name == "slicing":
        text = (f"{d['model']}  \nwhole {d['whole_ms']:.3f} ms, slices in sequence {d['slices_ms']:.3f} ms: "
                f"**slices / whole = {d['ratio']:.3f}**")
        if "tflite_ratio" in d:
            text += (f"  \nTFLite (LiteRT): whole {d['tflite_whole_ms']:.3f} ms, slices {d['tflite_slices_ms']:.3f} "
                     f"ms: **slices / whole = {d['tflite_ratio']:.3f}**")
        return text
    if name == "discovery":
        return md_table(["path", "ms", "vs static URL"],
                        [["cold (advert + resolve)", d["cold"], f"{d['cold_vs_static']:.0f}x"],
                         ["warm (advert up)", d["warm"], f"{d['warm_vs_static']:.0f}x"],
                         ["static URL", d["static"], "1x"]])
    if name == "adaptive_sim":
        return "SIMULATION. " + md_table(["policy", "frames", "fps", "KB/frame", "accuracy loss %"],
                                         [[r["policy"], r["frames"], r["fps"], r["kb_per_frame"], r["acc_loss_pct"]]
                                          for r in d["rows"]]) + \
            f"\n\nthroughput adaptive / fixed: **{d['throughput_ratio']:.2f}x**"
    return "```\n" + d.get("text", "").strip()[-4000:] + "\n```"


def write_report(out: Path, quick: bool, machine: dict[str, Any], outcomes: list[Outcome], wall: float) -> Path:
    by = {o.name: o for o in outcomes}
    lines = [f"# fleetpipe benchmark report{' (quick)' if quick else ''}", "",
             f"{datetime.now().isoformat(timespec='seconds')}; suite wall time {wall:.0f} s. Every figure below is a "
             "ratio against a baseline measured in the same run; absolute numbers on a shared machine are noise.", "",
             "## Machine", "", md_table(["", ""], [[k, v] for k, v in machine.items()]), "",
             "## Scripts", "",
             md_table(["script", "status", "seconds", "what"],
                      [[o.name, o.status if not o.parse_error else f"{o.status} (parse: {o.parse_error[:60]})",
                        o.seconds, next(s.what for s in SPECS if s.name == o.name)] for o in outcomes], 1), ""]
    sections: list[tuple[str, Callable[[], tuple[str, list[str]]]]] = []
    scale = by["scale"].data if "scale" in by and by["scale"].status == "ok" else None

    def add(name: str, title: str, fn: Callable[[Any], tuple[str, list[str]] | str]) -> None:
        def build() -> tuple[str, list[str]]:
            res = fn(by[name].data)
            return res if isinstance(res, tuple) else (res, [])

        if name in by:
            sections.append((f"{title} (`bench/{name}.py`)", build))

    add("scale", "EdgePipe metric: 16-device ViT fleet / one device", lambda d: section_scale(d, out))
    add("pipeline", "Pipeline: fleet vs single node vs prediction", lambda d: section_pipeline(d, scale, out))
    add("planner", "Planner: solve time and baselines vs the optimum", lambda d: section_planner(d, out))
    add("transport", "Transport: MQTT vs raw TCP", lambda d: section_transport(d, out))
    add("codec", "Codec: throughput vs np.copy", lambda d: section_codec(d, out))
    add("faults", "Faults: kill -9 mid-stream", section_faults)
    add("adaptive", "Adaptive vs fixed on a real fleet", section_adaptive)
    for n, t in (("adaptive_sim", "Adaptive vs fixed, simulated"), ("slicing", "Slicing overhead"),
                 ("discovery", "Discovery"), ("intra", "Intra-layer parallelism"),
                 ("early_exit", "COACH early exit on a real fleet")):
        add(n, t, lambda d, n=n: section_simple(n, d))
    for title, build in sections:
        name = title.split("`bench/")[1].split(".py")[0]
        o = by[name]
        lines += [f"## {title}", ""]
        if o.status != "ok" or o.data is None:
            lines += [f"**{o.status}** after {o.seconds:.0f} s (exit {o.returncode}). "
                      f"{('Parse error: ' + o.parse_error) if o.parse_error else ''} stderr tail:", "", "```",
                      o.stderr_tail or "(empty)", "```", ""]
            continue
        try:
            text, plots = build()
        except Exception as exc:
            lines += [f"(section not built: {type(exc).__name__}: {exc})", ""]
            continue
        lines += [text, ""] + [f"![{p}]({p})" for p in plots] + [""]
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def main(argv: list[str] | None = None) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="small parameters: the suite in < 10 min on 2 cores")
    parser.add_argument("--out", help="output folder (default results/<timestamp>[-quick])")
    parser.add_argument("--only", default="", help="comma-separated script names to run")
    parser.add_argument("--skip", default="", help="comma-separated script names to skip")
    parser.add_argument("--report-only", action="store_true",
                        help="rebuild report.md from an existing --out folder's results.json")
    args = parser.parse_args(argv)
    console = Console()
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    out = Path(args.out) if args.out else REPO / "results" / f"{stamp}{'-quick' if args.quick else ''}"
    (out / "logs").mkdir(parents=True, exist_ok=True)
    if args.report_only:
        doc = json.loads((out / "results.json").read_text())
        outcomes = [Outcome(**o) for o in doc["outcomes"]]
        path = write_report(out, doc["quick"], doc["machine"], outcomes, doc["wall_s"])
        console.print(f"report: {path}")
        return 0
    only = {s for s in args.only.split(",") if s}
    skip = {s for s in args.skip.split(",") if s}
    specs = [s for s in SPECS if (not only or s.name in only) and s.name not in skip]
    machine = machine_details(REPO)
    console.print(f"[bold]fleetpipe bench[/] {'quick' if args.quick else 'full'}: {len(specs)} scripts -> {out}")
    outcomes: list[Outcome] = []
    t0 = time.monotonic()
    with Progress(TextColumn("{task.description:<28}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console) as progress:
        task = progress.add_task("starting", total=len(specs))
        for spec in specs:
            progress.update(task, description=f"running {spec.name}")
            o = run_one(spec, args.quick, out, lambda: progress.refresh())
            outcomes.append(o)
            colour = "green" if o.status == "ok" else "red"
            progress.console.print(f"[{colour}]{o.status:7}[/] {spec.name:13} {o.seconds:6.1f} s"
                                   + (f"  {o.parse_error}" if o.parse_error else ""))
            progress.advance(task)
    wall = time.monotonic() - t0
    (out / "results.json").write_text(json.dumps(
        {"quick": args.quick, "machine": machine, "wall_s": wall,
         "outcomes": [{k: v for k, v in o.__dict__.items()} for o in outcomes]}, indent=1, default=str))
    path = write_report(out, args.quick, machine, outcomes, wall)
    failed = [o.name for o in outcomes if o.status != "ok"]
    console.print(f"suite {wall:.0f} s; report: {path}" + (f"; [red]failed: {', '.join(failed)}[/]" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
