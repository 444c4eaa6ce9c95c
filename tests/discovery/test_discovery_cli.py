"""The ``discover`` / ``broker announce`` parsers and the extensible ``broker`` group (no network)."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest

from fleetpipe import discovery_cli
from fleetpipe.cli import build_parser


def test_parser_has_discover_and_broker_announce() -> None:
    parser = build_parser()
    args = parser.parse_args(["discover", "--fleet", "lab", "--json", "--timeout", "0.5",
                              "--interface", "127.0.0.1", "--interface", "lo"])
    assert (args.fleet, args.json, args.timeout, args.interface) == ("lab", True, 0.5, ["127.0.0.1", "lo"])
    args = parser.parse_args(["broker", "announce", "--url", "mqtt://127.0.0.1:1883", "--fleet", "lab"])
    assert (args.url, args.fleet, args.interface) == ("mqtt://127.0.0.1:1883", "lab", None)
    assert args.func is discovery_cli._announce


def test_another_module_can_add_broker_subcommands() -> None:
    parser = argparse.ArgumentParser(prog="fleetpipe")
    subparsers = parser.add_subparsers(dest="command")
    discovery_cli.register(subparsers)
    group = discovery_cli.broker_subparsers(subparsers)  # e.g. from a `broker gen-creds` module
    assert group is discovery_cli.broker_subparsers(subparsers)  # created once
    gen = group.add_parser("gen-creds")
    gen.add_argument("--out")
    gen.set_defaults(func="gen")
    assert parser.parse_args(["broker", "gen-creds", "--out", "x"]).func == "gen"
    assert parser.parse_args(["broker", "announce", "--url", "mqtt://h", "--fleet", "f"]).func \
        is discovery_cli._announce


def test_broker_group_first_created_elsewhere() -> None:
    parser = argparse.ArgumentParser(prog="fleetpipe")
    subparsers = parser.add_subparsers(dest="command")
    discovery_cli.broker_subparsers(subparsers).add_parser("gen-creds")
    discovery_cli.register(subparsers)
    assert set(discovery_cli.broker_subparsers(subparsers).choices) == {"gen-creds", "announce"}


@pytest.mark.parametrize(("argv", "message"), [
    (["broker", "announce", "--url", "http://x", "--fleet", "lab"], "scheme must be mqtt"),
    (["broker", "announce", "--url", "mqtt://127.0.0.1:1883", "--fleet", "bad fleet",
      "--interface", "127.0.0.1"], "fleet 'bad fleet'"),
    (["discover", "--interface", "no-such-if0", "--timeout", "0.1"], "unknown interface"),
])
def test_bad_input_gives_a_clear_error(argv: list[str], message: str) -> None:
    cmd = [sys.executable, "-m", "fleetpipe", *argv]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    assert out.returncode != 0
    assert message in out.stderr
