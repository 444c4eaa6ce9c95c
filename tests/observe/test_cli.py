"""The observe subcommands are registered, and importing fleetpipe.observe stays cheap."""

from __future__ import annotations

import json
import subprocess
import sys

from fleetpipe.cli import build_parser


def test_subcommands_registered() -> None:
    parser = build_parser()
    args = parser.parse_args(["top", "--broker", "mqtt://127.0.0.1:1", "--fleet", "f", "--once", "--interval", "2"])
    assert (args.command, args.fleet, args.once, args.interval) == ("top", "f", True, 2.0)
    args = parser.parse_args(["timeline", "--fleet", "f", "--seconds", "3", "-o", "x.png"])
    assert (args.seconds, args.output) == (3.0, "x.png")
    args = parser.parse_args(["exporter", "--fleet", "f", "--port", "9999"])
    assert (args.port, args.bind) == (9999, "127.0.0.1")
    assert parser.parse_args(["ha-discovery", "--fleet", "f"]).prefix == "homeassistant"


def test_import_is_cheap() -> None:
    code = ("import sys, json, fleetpipe.observe, fleetpipe.metrics; "
            "print(json.dumps([m for m in ('rich', 'matplotlib', 'prometheus_client', 'paho', 'asyncio') "
            "if m in sys.modules]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert json.loads(out.stdout) == []
