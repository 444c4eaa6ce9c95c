"""Layering: the wire contract stays sans-IO, every module imports alone, and ``__all__`` is honest."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import tomllib

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = {
    "core": "fleetpipe",
    "node": "fleetpipe.node",
    "planner": "fleetpipe.planner",
    "models": "fleetpipe.models",
}
# numpy itself imports pickle, so it cannot be listed here.
FORBIDDEN = ("paho", "zeroconf", "onnxruntime", "onnx", "asyncio", "aiomqtt", "socket")

# Imports one module in a fresh interpreter and reports on it as JSON (missing optional deps = skip).
PROBE = r"""
import importlib, json, sys
name = sys.argv[1]
try:
    mod = importlib.import_module(name)
except ModuleNotFoundError as exc:
    if exc.name and not exc.name.startswith("fleetpipe"):
        print(json.dumps({"skip": f"needs {exc.name}"})); sys.exit(0)
    raise
exported = getattr(mod, "__all__", None)
missing = [n for n in (exported or []) if not hasattr(mod, n)]
print(json.dumps({"all": exported is not None, "missing": missing, "package": hasattr(mod, "__path__")}))
"""


def _module_names() -> list[str]:
    names = []
    for folder, package in FOLDERS.items():
        base = ROOT / folder
        if not base.is_dir():
            continue
        for path in sorted(base.rglob("*.py")):
            rel = path.relative_to(base).with_suffix("").parts
            if "__main__" in rel or any(p.startswith(".") for p in rel):
                continue
            if rel[-1] == "__init__":
                rel = rel[:-1]
            names.append(".".join((package, *rel)))
    return names


@pytest.fixture(scope="module")
def probes() -> dict[str, dict[str, Any]]:
    """Probe every module, two fresh interpreters at a time (the machine is small)."""
    results: dict[str, dict[str, Any]] = {}
    pending = _module_names()
    running: list[tuple[str, subprocess.Popen[str]]] = []
    while pending or running:
        while pending and len(running) < 2:
            name = pending.pop(0)
            proc = subprocess.Popen([sys.executable, "-c", PROBE, name], stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True, cwd="/")
            running.append((name, proc))
        name, proc = running.pop(0)
        out, err = proc.communicate(timeout=120)
        if proc.returncode:
            last = err.strip().splitlines()[-1] if err.strip() else f"rc={proc.returncode}"
            results[name] = {"error": last}
        else:
            results[name] = json.loads(out.strip().splitlines()[-1])
    return results


def _run(code: str) -> str:
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd="/")
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_wire_is_sans_io() -> None:
    out = _run(
        "import sys, json; import fleetpipe.wire, fleetpipe.codec, fleetpipe.topics;"
        f"print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in {FORBIDDEN!r})))"
    )
    assert json.loads(out) == []


def test_every_module_imports_alone(probes: dict[str, dict[str, Any]]) -> None:
    assert "fleetpipe.wire" in probes and "fleetpipe.codec" in probes
    broken = {name: r["error"] for name, r in probes.items() if "error" in r}
    assert not broken, broken


def test_all_names_exist(probes: dict[str, dict[str, Any]]) -> None:
    missing = {name: r["missing"] for name, r in probes.items() if r.get("missing")}
    assert not missing, missing


def test_packages_declare_all(probes: dict[str, dict[str, Any]]) -> None:
    lacking = [name for name, r in probes.items() if r.get("package") and not r.get("all")]
    assert not lacking, lacking


def test_declared_packages_match_folders() -> None:
    conf = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    declared = set(conf["packages"])
    dirs = conf["package-dir"]
    for package in declared:
        root = max((p for p in dirs if package == p or package.startswith(p + ".")), key=len)
        sub = package[len(root) :].strip(".").split(".") if package != root else []
        folder = ROOT / dirs[root] / Path(*sub)
        assert (folder / "__init__.py").is_file() or not any(folder.glob("*.py")), package
    for folder, package in FOLDERS.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / folder).parts
            assert ".".join((package, *rel)) in declared, f"{init} is not listed in pyproject packages"
