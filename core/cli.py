"""The ``fleetpipe`` command: one entry point, subcommands contributed by the subpackages.

This is the composition root. Subcommand modules are imported by name so that ``fleetpipe.*``
core modules never import ``fleetpipe.node``/``planner``/``models`` statically. Each subcommand
module defines ``register(subparsers)`` that adds its parser(s) and sets ``func(args) -> int``.
Modules must stay cheap to import (heavy imports such as onnx happen inside ``func``).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from collections.abc import Sequence

from fleetpipe import __version__, timing
from fleetpipe.errors import FleetpipeError

__all__ = ["DAEMONS", "EXTRAS", "SUBCOMMAND_MODULES", "build_parser", "main"]

DAEMONS = ("node", "planner")
# Optional imports -> the extra that provides them (pyproject.toml [project.optional-dependencies]).
EXTRAS = {"matplotlib": "plot", "prometheus_client": "observe", "sklearn": "learned", "numba": "fast",
          "ai_edge_litert": "tflite", "tflite_runtime": "tflite"}

# Modules that contribute subcommands; a module that is not there yet is skipped.
SUBCOMMAND_MODULES: tuple[str, ...] = (
    "fleetpipe.models.cli",
    "fleetpipe.models.calibrate_cli",
    "fleetpipe.planner.cli",
    "fleetpipe.planner.service",
    "fleetpipe.node.cli",
    "fleetpipe.client_cli",
    "fleetpipe.planner.demo",
    "fleetpipe.discovery_cli",
    "fleetpipe.observe",
    "fleetpipe.deploy.cli",
)


def build_parser() -> argparse.ArgumentParser:
    """Build the full argument parser with every available subcommand."""
    parser = argparse.ArgumentParser(
        prog="fleetpipe",
        description="Run one neural network as a pipeline across a heterogeneous edge fleet, over MQTT.")
    parser.add_argument("--version", action="version", version=f"fleetpipe {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv for debug)")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name is not None and name.startswith(exc.name):
                continue  # that subcommand module does not exist (yet)
            raise
        module.register(subparsers)
    _verbose_everywhere(subparsers)
    _show_defaults(subparsers)
    return parser


def _show_defaults(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Every option's help says its default: the parser's own, or (None) the config setting it fills."""
    for sub in set(subparsers.choices.values()):
        config_defaults = getattr(sub, "config_defaults", {})
        for action in sub._actions:
            if isinstance(action, argparse._SubParsersAction):
                _show_defaults(action)
                continue
            if not action.option_strings or action.help == argparse.SUPPRESS or isinstance(
                    action, (argparse._HelpAction, argparse._VersionAction)):
                continue
            text = action.help or ""
            if "default" in text.lower():
                continue
            if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction, argparse._CountAction)):
                shown = "off"  # the flag is not given
            elif action.dest in config_defaults:
                shown = config_defaults[action.dest]
            else:
                shown = action.default
            action.help = f"{text} (default: {_shown(shown)})".strip()


def _shown(value: object) -> str:
    if value is None or value == "" or value == ():
        return "none"
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value)
    return str(value)


def _verbose_everywhere(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """``-v`` after the subcommand too (``fleetpipe node -v``), at every level of subcommands."""
    for sub in set(subparsers.choices.values()):
        if not any("-v" in a.option_strings for a in sub._actions):
            sub.add_argument("-v", "--verbose", action="count", default=0, dest="sub_verbose",
                             help="more logging (-vv for debug)")
        for action in sub._actions:
            if isinstance(action, argparse._SubParsersAction):
                _verbose_everywhere(action)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``fleetpipe`` command line; returns the process exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    # The daemons log their lifecycle (connected, assigned, loaded, draining, stopped) at INFO by default: that is
    # what `journalctl -u fleetpipe-node` shows. The other commands stay quiet unless -v.
    base = logging.INFO if getattr(args, "command", None) in DAEMONS else logging.WARNING
    verbose = args.verbose + getattr(args, "sub_verbose", 0)
    level = max(base - 10 * min(verbose, 2), logging.DEBUG)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        timing.override_from_env(dict(os.environ))
    except ValueError as exc:
        parser.error(str(exc))
    func = getattr(args, "func", None)
    if func is None:
        parser.print_help()
        return 2
    try:
        return int(func(args) or 0)
    except KeyboardInterrupt:
        return 130
    except FleetpipeError as exc:  # an operator's mistake (bad URL, model, input, config): one line, no traceback
        print(f"fleetpipe {args.command}: {exc}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as exc:
        extra = EXTRAS.get((exc.name or "").split(".")[0])
        if extra is None:
            raise
        print(f"fleetpipe {args.command} needs {exc.name}: pip install 'fleetpipe[{extra}]'", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
