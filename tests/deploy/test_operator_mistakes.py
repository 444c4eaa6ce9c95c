"""Every operator mistake gives one line, no traceback, a non-zero exit, quickly (issue 20 item 8).

Each row is a command line as an operator types it (files it names are made in the test's folder: ``{tmp}``) and a
fragment the one line must contain. Rows run in-process through ``fleetpipe.cli.main`` (an exception escaping it is
the traceback the operator would see); a few rows also run as real processes. Nothing here needs a broker: every
mistake must be caught before connecting. The broker URL rows cover every command that takes one.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from fleetpipe.cli import main

BOUND_S = 10.0
CLOSED = "mqtt://127.0.0.1:9"  # never reached: each row fails before connecting

BAD_URLS = {"http": "http://127.0.0.1:1883", "no-scheme": "127.0.0.1:1883", "port-text": "mqtt://h:notaport",
            "port-range": "mqtt://h:99999"}
URL_COMMANDS = {
    "node": ["node", "--no-announce"],
    "planner": ["planner", "--model", "zoo:resnet18", "--no-announce"],
    "infer": ["infer", "--input", "{tmp}/x.npy"],
    "top": ["top", "--once"],
    "timeline": ["timeline", "--seconds", "1"],
    "exporter": ["exporter"],
    "ha-discovery": ["ha-discovery"],
    "install-service": ["install-service", "--prefix", "{tmp}/root"],
}
URL_FLAG = {"install-service": "--broker"}

ROWS: dict[str, tuple[list[str], str]] = {
    # models
    "planner-missing-model": (["planner", "--broker", CLOSED, "--model", "{tmp}/nope.onnx", "--no-announce"],
                              "no such model file"),
    "planner-corrupt-model": (["planner", "--broker", CLOSED, "--model", "{tmp}/bad.onnx", "--no-announce"],
                              "not a readable ONNX model"),
    "planner-unknown-zoo": (["planner", "--broker", CLOSED, "--model", "zoo:nosuch", "--no-announce"],
                            "unknown zoo model 'nosuch'"),
    "demo-missing-model": (["demo", "--model", "{tmp}/nope.onnx"], "no such model file"),
    "demo-corrupt-model": (["demo", "--model", "{tmp}/bad.onnx"], "not a readable ONNX model"),
    "demo-unknown-zoo": (["demo", "--model", "nosuch"], "unknown zoo model 'nosuch'"),
    # inputs
    "infer-missing-input": (["infer", "--broker", CLOSED, "--input", "{tmp}/nope.npy"], "cannot read input"),
    "infer-not-npy": (["infer", "--broker", CLOSED, "--input", "{tmp}/x.txt"], "is not a .npy file"),
    "infer-object-npy": (["infer", "--broker", CLOSED, "--input", "{tmp}/obj.npy"], "input"),
    # fleet names
    "node-fleet": (["node", "--broker", CLOSED, "--fleet", "bad/fleet", "--no-announce"], "fleet 'bad/fleet'"),
    "planner-fleet": (["planner", "--broker", CLOSED, "--fleet", "a+b", "--model", "zoo:resnet18"], "fleet 'a+b'"),
    "infer-fleet": (["infer", "--broker", CLOSED, "--fleet", "a b", "--input", "{tmp}/x.npy"], "fleet 'a b'"),
    "top-fleet": (["top", "--broker", CLOSED, "--fleet", "#", "--once"], "fleet '#'"),
    "install-fleet": (["install-service", "--fleet", "x/y", "--prefix", "{tmp}/root"], "fleet 'x/y'"),
    # ports
    "exporter-port-in-use": (["exporter", "--broker", CLOSED, "--port", "{busy_port}"], "cannot serve on"),
    # unknown keys in every TOML
    "node-toml-key": (["node", "--config", "{tmp}/node.toml"], "nmae"),
    "node-toml-broker-key": (["node", "--config", "{tmp}/node-broker.toml"], "pasword_file"),
    "node-toml-table": (["node", "--config", "{tmp}/node-table.toml"], "[nod]"),
    "planner-toml-key": (["planner", "--config", "{tmp}/planner.toml"], "modle"),
    "client-toml-broker-key": (["infer", "--config", "{tmp}/client.toml", "--input", "{tmp}/x.npy"], "pasword_file"),
    "observer-toml-key": (["top", "--config", "{tmp}/observer.toml", "--once"], "flet"),
    "fleet-file-key": (["plan", "--model", "zoo:resnet18", "--fleet", "{tmp}/fleet.toml"], "devices"),
    "fleet-file-device-key": (["plan", "--model", "zoo:resnet18", "--fleet", "{tmp}/fleet-dev.toml"], "clas"),
}
for _cmd, _argv in URL_COMMANDS.items():
    for _kind, _url in BAD_URLS.items():
        ROWS[f"{_cmd}-url-{_kind}"] = ([*_argv, URL_FLAG.get(_cmd, "--broker"), _url], "URL")

FILES = {
    "bad.onnx": b"this is not a protobuf",
    "x.txt": b"1 2 3\n",
    "node.toml": b'[node]\nnmae = "pi-1"\n',
    "node-broker.toml": b'[node]\nname = "pi-1"\n[broker]\nurl = "mqtt://127.0.0.1:9"\npasword_file = "p"\n',
    "node-table.toml": b'[nod]\nname = "pi-1"\n',
    "planner.toml": b'[planner]\nmodle = "m.onnx"\n[broker]\nurl = "mqtt://127.0.0.1:9"\n',
    "client.toml": b'[broker]\nurl = "mqtt://127.0.0.1:9"\npasword_file = "p"\n',
    "observer.toml": b'flet = "lab"\n[broker]\nurl = "mqtt://127.0.0.1:9"\n',
    "fleet.toml": b'[[devices]]\nname = "a"\nclass = "rpi4"\n',
    "fleet-dev.toml": b'[[device]]\nname = "a"\nclas = "rpi4"\n',
}


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    for name, data in FILES.items():
        (tmp_path / name).write_bytes(data)
    np.save(tmp_path / "x.npy", np.zeros((1, 3, 8, 8), np.float32))
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    return tmp_path


def _argv(argv: list[str], tmp: Path, busy_port: int) -> list[str]:
    return [a.format(tmp=tmp, busy_port=busy_port) for a in argv]


@pytest.fixture
def busy_port() -> object:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


@pytest.mark.parametrize("row", sorted(ROWS))
def test_one_line_no_traceback(row: str, workdir: Path, busy_port: int, capsys: pytest.CaptureFixture[str]) -> None:
    argv, fragment = ROWS[row]
    t0 = time.monotonic()
    rc = main(_argv(argv, workdir, busy_port))  # an exception here is the operator's traceback
    took = time.monotonic() - t0
    out, err = capsys.readouterr()
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc != 0, (row, out, err)
    assert len(lines) == 1 and fragment in lines[0], (row, err)
    assert lines[0].startswith("fleetpipe "), lines[0]
    assert took < BOUND_S, (row, took)


def test_missing_optional_extra_names_it(workdir: Path, monkeypatch: pytest.MonkeyPatch,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    for module, argv, extra in (("prometheus_client", ["exporter", "--broker", CLOSED], "observe"),
                                ("matplotlib", ["timeline", "--broker", CLOSED], "plot"),
                                ("matplotlib", ["demo", "--plot", str(workdir / "t.png")], "plot")):
        with monkeypatch.context() as m:
            m.setitem(sys.modules, module, None)  # as if the extra were not installed: import raises
            rc = main(argv)
        err = capsys.readouterr().err
        lines = [line for line in err.splitlines() if line.strip()]
        assert rc != 0 and len(lines) == 1 and f"fleetpipe[{extra}]" in lines[0], (argv, err)


@pytest.mark.parametrize("row", ["node-url-http", "planner-unknown-zoo", "infer-not-npy", "node-toml-key"])
def test_as_a_process(row: str, workdir: Path, busy_port: int) -> None:
    argv, fragment = ROWS[row]
    proc = subprocess.run([sys.executable, "-m", "fleetpipe", *_argv(argv, workdir, busy_port)], capture_output=True,
                          text=True, timeout=60, check=False)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr
    assert len(lines) == 1 and fragment in lines[0], proc.stderr
