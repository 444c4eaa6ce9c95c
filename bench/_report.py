"""Helpers for bench/run_all.py: machine details, Markdown tables, matplotlib (Agg) plots."""

from __future__ import annotations

import os
import platform
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

__all__ = ["fmt", "machine_details", "md_table", "plot_bars", "plot_lines"]


def fmt(value: Any, digits: int = 2) -> str:
    """A table cell: floats rounded, None as '-'."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float):
        if value != value:  # NaN
            return "nan"
        if abs(value) >= 1000:
            return f"{value:,.0f}"
        return f"{value:.{digits}f}"
    return str(value).replace("|", "\\|")


def md_table(headers: list[str], rows: list[list[Any]], digits: int = 2) -> str:
    """A GitHub-flavoured Markdown table."""
    def numeric(cell: Any) -> bool:
        return isinstance(cell, int | float) or bool(re.fullmatch(r"[-+*\d.,x%() ]*\d[-+*\d.,x%() ]*", str(cell)))

    right = [i > 0 and all(numeric(r[i]) for r in rows if i < len(r) and r[i] not in (None, "")) for i in
             range(len(headers))]
    out = ["| " + " | ".join(headers) + " |", "|" + "|".join("---:" if r else "---" for r in right) + "|"]
    for row in rows:
        out.append("| " + " | ".join(fmt(c, digits) for c in row) + " |")
    return "\n".join(out)


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def machine_details(repo: Path) -> dict[str, Any]:
    """CPU model, cores, memory, Python and library versions, BLAS/OMP environment, load, git revision."""
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith(("model name", "hardware", "processor\t: arm")):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gb = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_gb = round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=repo, capture_output=True, text=True,
                             timeout=10).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo,
                                    capture_output=True, text=True, timeout=10).stdout.strip())
    except (OSError, subprocess.SubprocessError):
        rev, dirty = "unknown", False
    try:
        mosq = subprocess.run(["mosquitto", "-h"], capture_output=True, text=True, timeout=10).stdout.splitlines()[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        mosq = "not found"
    return {
        "cpu_model": cpu,
        "logical_cpus": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "memory_gb": mem_gb,
        "kernel": platform.release(),
        "arch": platform.machine(),
        "python": sys.version.split()[0],
        "numpy": _version("numpy"),
        "onnxruntime": _version("onnxruntime"),
        "paho-mqtt": _version("paho-mqtt"),
        "onnx": _version("onnx"),
        "numba": _version("numba"),
        "mosquitto": mosq,
        "OPENBLAS_NUM_THREADS": os.environ.get("OPENBLAS_NUM_THREADS", "(unset)"),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "(unset)"),
        "loadavg_1m_at_start": round(os.getloadavg()[0], 2),
        "git": f"{rev}{' (dirty)' if dirty else ''}",
    }


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_lines(path: Path, title: str, xlabel: str, ylabel: str, series: dict[str, tuple[list[float], list[float]]],
               *, logx: bool = False, logy: bool = False, hline: float | None = None,
               points: dict[str, tuple[list[float], list[float]]] | None = None) -> Path:
    """One PNG with a line per series (and optional single markers, e.g. measured points)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=110)
    for name, (xs, ys) in series.items():
        ax.plot(xs, ys, marker="o", label=name)
    for name, (xs, ys) in (points or {}).items():
        ax.scatter(xs, ys, marker="*", s=160, zorder=5, label=name)
    if hline is not None:
        ax.axhline(hline, color="grey", linestyle="--", linewidth=1)
    if logx:
        ax.set_xscale("log", base=2)
    if logy:
        ax.set_yscale("log")
    ax.set_title(title, fontsize=10)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_bars(path: Path, title: str, ylabel: str, groups: list[str], series: dict[str, list[float | None]],
              *, hline: float | None = None, logy: bool = False) -> Path:
    """Grouped bars: one group per label in ``groups``, one bar per series (None = missing)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(max(6.4, 0.9 * len(groups) * max(len(series), 1) / 2), 4.0), dpi=110)
    n = max(len(series), 1)
    width = 0.8 / n
    for k, (name, values) in enumerate(series.items()):
        xs = [i + (k - (n - 1) / 2) * width for i in range(len(groups))]
        ys = [float("nan") if v is None else v for v in values]
        ax.bar(xs, ys, width, label=name)
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels(groups, fontsize=8)
    if hline is not None:
        ax.axhline(hline, color="grey", linestyle="--", linewidth=1)
    if logy:
        ax.set_yscale("log")
    ax.set_title(title, fontsize=10)
    ax.set_ylabel(ylabel)
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
