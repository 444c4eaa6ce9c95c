"""Config precedence for every setting of every config: flag > FLEETPIPE_* env > config file > default.

Each row names a setting, its default, a value in the TOML file, a value in the environment (as a string, the
way systemd's Environment= or a shell gives it) and, where the command has one, a flag and the value it gives.
Every row is checked layer by layer through the real argument parser and the commands' own config builders, and a
coverage check fails when a config grows a setting that no row tests.
"""

from __future__ import annotations

import dataclasses
import json
import socket
from pathlib import Path
from typing import Any

import pytest

from fleetpipe.cli import build_parser
from fleetpipe.cliargs import DEFAULT_URL, broker_from_args
from fleetpipe.config import BrokerConfig, NodeConfig, PlannerConfig
from fleetpipe.node.cli import build_config as node_config
from fleetpipe.planner.service import build_config as planner_config

HOST = socket.gethostname().split(".")[0] or "node"


@dataclasses.dataclass(frozen=True)
class Row:
    key: str  # "broker.url" for a [broker] setting
    default: Any
    file: Any  # TOML value
    env: str
    env_value: Any
    flag: tuple[str, ...] = ()  # argv; () = the command has no flag for it
    flag_value: Any = None


def _broker_rows(*, ca_flag: bool) -> list[Row]:
    return [
        Row("broker.url", None, "mqtt://file:1", "mqtt://env:2", "mqtt://env:2", ("--broker", "mqtt://flag:3"),
            "mqtt://flag:3"),
        Row("broker.username", None, "u-file", "u-env", "u-env", ("--username", "u-flag"), "u-flag"),
        Row("broker.password_file", None, "/f.pw", "/e.pw", "/e.pw", ("--password-file", "/g.pw"), "/g.pw"),
        Row("broker.ca_certs", None, "/f.crt", "/e.crt", "/e.crt", ("--ca-certs", "/g.crt") if ca_flag else (),
            "/g.crt"),
        Row("broker.certfile", None, "/f.pem", "/e.pem", "/e.pem"),
        Row("broker.keyfile", None, "/f.key", "/e.key", "/e.key"),
        Row("broker.static_fallback", (), ["mqtt://a:1"], "mqtt://b:2,mqtt://c:3", ("mqtt://b:2", "mqtt://c:3")),
    ]


NODE_ROWS = [
    Row("name", HOST, "n-file", "n-env", "n-env", ("--name", "n-flag"), "n-flag"),
    Row("fleet", "default", "f-file", "f-env", "f-env", ("--fleet", "f-flag"), "f-flag"),
    Row("emulate", None, "rpi4", "rpi5", "rpi5", ("--emulate", "x86"), "x86"),
    Row("cache_dir", "~/.cache/fleetpipe/slices", "/c/file", "/c/env", "/c/env", ("--cache-dir", "/c/flag"),
        "/c/flag"),
    Row("threads", 1, 2, "3", 3, ("--threads", "4"), 4),
    Row("queue_limit", 64, 10, "20", 20),
    Row("drain_timeout_s", 10.0, 1.5, "2.5", 2.5),
    Row("interfaces", (), ["lo"], "eth0,wlan0", ("eth0", "wlan0"), ("--interface", "br0"), ("br0",)),
    Row("announce", True, False, "true", True, ("--no-announce",), False),
    Row("adaptive_bits", True, False, "yes", True, ("--fixed-bits",), False),
    Row("report_profile", True, False, "1", True, ("--no-profile-report",), False),
    Row("planner_key", None, "a2V5LWZpbGU=", "a2V5LWVudg==", "a2V5LWVudg=="),
    Row("max_slice_bytes", 1 << 30, 1000, "2000", 2000),
    Row("max_tensor_bytes", 1 << 30, 1000, "2000", 2000),
    Row("allow_fake_runtime", False, True, "false", False),
    *_broker_rows(ca_flag=True),
]

PLANNER_ROWS = [
    Row("model", None, "file.onnx", "env.onnx", "env.onnx", ("--model", "flag.onnx"), "flag.onnx"),
    Row("fleet", "default", "f-file", "f-env", "f-env", ("--fleet", "f-flag"), "f-flag"),
    Row("bits", 8, 4, "6", 6, ("--bits", "2"), 2),
    Row("min_nodes", 1, 2, "3", 3, ("--min-nodes", "4"), 4),
    Row("expect_nodes", 0, 1, "2", 2, ("--expect-nodes", "3"), 3),
    # One syntax, NAME=D,D,... (an env var's commas split it; fleetpipe.models.shapes reads both forms).
    Row("input_shape", (), ["x=1,3,8,8"], "x=1,3,16,16", ("x=1", "3", "16", "16"), ("--input-shape", "x=1,3,32,32"),
        ("x=1,3,32,32",)),
    Row("replan_threshold", 0.2, 0.3, "0.4", 0.4, ("--replan-threshold", "0.5"), 0.5),
    Row("time_limit_s", 5.0, 6.0, "7", 7.0, ("--time-limit", "8"), 8.0),
    Row("calibration", None, "a.json", "b.json", "b.json", ("--calibration", "c.json"), "c.json"),
    Row("adapt", True, False, "true", True, ("--no-adapt",), False),
    Row("early_exit", True, False, "true", True, ("--no-early-exit",), False),
    Row("interfaces", (), ["lo"], "eth0", ("eth0",), ("--interface", "br0"), ("br0",)),
    Row("announce", True, False, "on", True, ("--no-announce",), False),
    Row("intra", "", "latency", "pipeline", "pipeline", ("--intra", "latency"), "latency"),
    Row("intra_msg_ms", None, 1.0, "2", 2.0, ("--msg-ms", "3"), 3.0),
    Row("intra_tiles", 4, 2, "3", 3, ("--tiles", "1"), 1),
    Row("intra_measure_parts", True, False, "true", True, ("--no-measure-parts",), False),
    Row("profile", None, "p1.json", "p2.json", "p2.json", ("--profile", "p3.json"), "p3.json"),
    Row("bit_tolerance", 0.01, 0.02, "0.03", 0.03, ("--bit-tolerance", "0.04"), 0.04),
    Row("bit_floors", True, False, "true", True, ("--no-bit-floors",), False),
    Row("signing_key", None, "/k/file.key", "/k/env.key", "/k/env.key"),
    *_broker_rows(ca_flag=True),
]

CLIENT_ROWS = [
    Row("url", DEFAULT_URL, "mqtt://file:1", "mqtt://env:2", "mqtt://env:2", ("--broker", "mqtt://flag:3"),
        "mqtt://flag:3"),
    Row("username", None, "u-file", "u-env", "u-env", ("--username", "u-flag"), "u-flag"),
    Row("password_file", None, "/f.pw", "/e.pw", "/e.pw", ("--password-file", "/g.pw"), "/g.pw"),
    Row("ca_certs", None, "/f.crt", "/e.crt", "/e.crt", ("--ca-certs", "/g.crt"), "/g.crt"),
    Row("certfile", None, "/f.pem", "/e.pem", "/e.pem"),
    Row("keyfile", None, "/f.key", "/e.key", "/e.key"),
    Row("fleet", "default", "f-file", "f-env", "f-env", ("--fleet", "f-flag"), "f-flag"),
]
CLIENT_COMMANDS = {"infer": ["--input", "x.npy"], "top": [], "timeline": [], "exporter": [], "ha-discovery": []}


def _fields(cls: type) -> set[str]:
    out = {f.name for f in dataclasses.fields(cls) if f.name != "broker"}
    if any(f.name == "broker" for f in dataclasses.fields(cls)):
        out |= {f"broker.{f.name}" for f in dataclasses.fields(BrokerConfig)}
    return out


def test_every_setting_has_a_row() -> None:
    assert {r.key for r in NODE_ROWS} == _fields(NodeConfig)
    assert {r.key for r in PLANNER_ROWS} == _fields(PlannerConfig)
    assert {r.key for r in CLIENT_ROWS} == {"url", "username", "password_file", "ca_certs", "certfile", "keyfile",
                                            "fleet"}


def _env_name(key: str) -> str:
    return "FLEETPIPE_" + key.replace(".", "_").upper()


def _toml(section: str, values: dict[str, Any]) -> str:
    top = [f"{k} = {json.dumps(v)}" for k, v in values.items() if "." not in k]
    broker = [f"{k.split('.', 1)[1]} = {json.dumps(v)}" for k, v in values.items() if k.startswith("broker.")]
    return "\n".join([f"[{section}]", *top, "", "[broker]", *broker]) + "\n"


def _get(config: Any, key: str) -> Any:
    obj = config
    for part in key.split("."):
        obj = getattr(obj, part)
    return obj


def _layers(row: Row) -> list[tuple[str, bool, bool, bool, Any]]:
    layers = [("default", False, False, False, row.default), ("file", True, False, False, row.file),
              ("env", True, True, False, row.env_value)]
    if row.flag:
        layers.append(("flag", True, True, True, row.flag_value))
    return layers


def _norm(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


@pytest.mark.parametrize("row", NODE_ROWS, ids=lambda r: r.key)
def test_node_precedence(row: Row, tmp_path: Path) -> None:
    for layer, use_file, use_env, use_flag, expected in _layers(row):
        cfg_file = tmp_path / f"{layer}.toml"
        cfg_file.write_text(_toml("node", {row.key: row.file} if use_file else {}))
        argv = ["node", "--config", str(cfg_file), *(row.flag if use_flag else ())]
        env = {_env_name(row.key): row.env} if use_env else {}
        config = node_config(build_parser().parse_args(argv), env)
        assert _get(config, row.key) == _norm(expected), (row.key, layer)


@pytest.mark.parametrize("row", PLANNER_ROWS, ids=lambda r: r.key)
def test_planner_precedence(row: Row, tmp_path: Path) -> None:
    for layer, use_file, use_env, use_flag, expected in _layers(row):
        if row.key == "model" and layer == "default":
            continue  # required: no default
        values = {"model": "base.onnx"} if row.key != "model" else {}
        if use_file:
            values[row.key] = row.file
        cfg_file = tmp_path / f"{layer}.toml"
        cfg_file.write_text(_toml("planner", values))
        argv = ["planner", "--config", str(cfg_file), *(row.flag if use_flag else ())]
        env = {_env_name(row.key): row.env} if use_env else {}
        config = planner_config(build_parser().parse_args(argv), env)
        assert _get(config, row.key) == _norm(expected), (row.key, layer)


def test_node_name_from_the_unit_config_beats_the_host_name(tmp_path: Path) -> None:
    """The unit passes no --name: the name written by install-service must be the node's name."""
    cfg = tmp_path / "node.toml"
    cfg.write_text('[node]\nname = "pi-7"\n')
    config = node_config(build_parser().parse_args(["node", "--config", str(cfg)]), {})
    assert config.name == "pi-7" != HOST


@pytest.mark.parametrize("command", sorted(CLIENT_COMMANDS))
@pytest.mark.parametrize("row", CLIENT_ROWS, ids=lambda r: r.key)
def test_client_and_observer_precedence(command: str, row: Row, tmp_path: Path) -> None:
    for layer, use_file, use_env, use_flag, expected in _layers(row):
        cfg_file = tmp_path / f"{layer}.toml"
        if row.key == "fleet":
            cfg_file.write_text(f"fleet = {json.dumps(row.file)}\n" if use_file else "")
        else:
            cfg_file.write_text(f"[broker]\n{row.key} = {json.dumps(row.file)}\n" if use_file else "")
        argv = [command, "--config", str(cfg_file), *CLIENT_COMMANDS[command], *(row.flag if use_flag else ())]
        args = build_parser().parse_args(argv)
        env = {("FLEETPIPE_FLEET" if row.key == "fleet" else _env_name("broker." + row.key)): row.env} if use_env \
            else {}
        broker = broker_from_args(args, env)
        got = args.fleet if row.key == "fleet" else getattr(broker, row.key)
        assert got == expected, (command, row.key, layer)
