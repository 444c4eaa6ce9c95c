"""Every option of every command says its default in --help (issue 20 item 15), and -v works after a subcommand."""

from __future__ import annotations

import argparse

from fleetpipe.cli import build_parser, main


def _parsers(parser: argparse.ArgumentParser, path: str = "fleetpipe"):
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _parsers(sub, f"{path} {name}")


def test_every_option_shows_its_default() -> None:
    missing = []
    for path, parser in _parsers(build_parser()):
        if path == "fleetpipe":
            continue
        for action in parser._actions:
            if not action.option_strings or isinstance(action, argparse._HelpAction):
                continue
            if "default" not in (action.help or "").lower():
                missing.append(f"{path} {action.option_strings[0]}")
    assert not missing, missing


def test_daemon_defaults_come_from_the_config() -> None:
    node = dict(_parsers(build_parser()))["fleetpipe node"]
    helps = {a.dest: a.help for a in node._actions}
    assert "(default: 1)" in helps["threads"] and "~/.cache/fleetpipe/slices" in helps["cache_dir"]
    planner = dict(_parsers(build_parser()))["fleetpipe planner"]
    assert "(default: none)" in {a.dest: a.help for a in planner._actions}["calibration"]


def test_verbose_after_the_subcommand(capsys) -> None:
    args = build_parser().parse_args(["node", "-v", "-v", "--name", "x"])
    assert args.sub_verbose == 2
    assert main(["broker", "config", "-v"]) == 0 and "listener" in capsys.readouterr().out
