"""Broker connection options shared by the client-side commands (``infer``, ``top``, ``timeline``, ...).

The daemons read a full ``NodeConfig``/``PlannerConfig``; these commands only need a ``BrokerConfig``.
Secrets never come from argv (``ps`` shows it): a password is read from ``--password-file`` or from the
``password_file`` of the ``[broker]`` table in ``--config``.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from collections.abc import Mapping
from pathlib import Path

from fleetpipe._compat import tomllib
from fleetpipe.config import DEFAULT_FLEET, BrokerConfig, validate_name
from fleetpipe.errors import ConfigError

__all__ = ["DEFAULT_URL", "add_broker_args", "broker_from_args", "config_defaults"]

DEFAULT_URL = "mqtt://127.0.0.1:1883"
_KEYS = ("url", "username", "password_file", "ca_certs", "certfile", "keyfile")


def add_broker_args(p: argparse.ArgumentParser, *, required: bool = False) -> None:
    """``--broker``, ``--config``, the credential options and ``--fleet``."""
    p.add_argument("--broker", required=required,
                   help=f"broker URL, mqtts:// for TLS (default: the config file's, else {DEFAULT_URL})")
    p.add_argument("--config", help="TOML file whose [broker] table gives url, username, password_file, ca_certs")
    p.add_argument("--username", help="MQTT username (secure broker: this identity from `broker gen-creds`)")
    p.add_argument("--password-file", dest="password_file", help="file holding the MQTT password")
    p.add_argument("--ca-certs", dest="ca_certs", help="CA bundle to verify the broker's TLS certificate")
    p.add_argument("--fleet", help="fleet name (default: FLEETPIPE_FLEET, the config file's fleet, else 'default')")


def broker_from_args(args: argparse.Namespace, env: Mapping[str, str] | None = None) -> BrokerConfig:
    """The ``BrokerConfig``: flags > ``FLEETPIPE_BROKER_*`` env > the ``--config`` file's ``[broker]`` table > default.

    Also resolves ``args.fleet`` the same way (``--fleet`` > ``FLEETPIPE_FLEET`` > the file's ``fleet`` > 'default').
    ``env`` defaults to the process environment (this is the composition root of the client-side commands).
    """
    env = os.environ if env is None else env
    values: dict[str, object] = {}
    fleet: object = DEFAULT_FLEET
    if getattr(args, "config", None):
        data = _read_toml(args.config)
        table = data.get("broker", {})
        if not isinstance(table, dict):
            raise ConfigError(f"{args.config}: [broker] must be a table")
        unknown = sorted(set(table) - set(_KEYS)) + sorted(set(data) - {"broker", "fleet"})
        if unknown:
            raise ConfigError(f"{args.config}: unknown setting {unknown[0]!r} (known: [broker] "
                              f"{', '.join(_KEYS)}; fleet)")
        values.update({k: str(v) for k, v in table.items()})
        fleet = data.get("fleet", fleet)
    for key in _KEYS:
        if f"FLEETPIPE_BROKER_{key.upper()}" in env:
            values[key] = env[f"FLEETPIPE_BROKER_{key.upper()}"]
    fleet = env.get("FLEETPIPE_FLEET", fleet)
    for key, flag in (("url", "broker"), ("username", "username"), ("password_file", "password_file"),
                      ("ca_certs", "ca_certs")):
        value = getattr(args, flag, None)
        if value is not None:
            values[key] = value
    values.setdefault("url", DEFAULT_URL)
    if hasattr(args, "fleet"):
        args.fleet = validate_name("fleet", str(args.fleet if args.fleet is not None else fleet))
    return dataclasses.replace(BrokerConfig(), **values)  # type: ignore[arg-type]


def _read_toml(path: str) -> dict[str, object]:
    try:
        return tomllib.loads(Path(path).read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"cannot read config {path}: {exc}") from exc


def config_defaults(cls: type, overrides: Mapping[str, str] | None = None) -> dict[str, str]:
    """dest -> shown default for a daemon's flags, from its config dataclass (``broker_<field>`` for the broker):
    what a flag left out gives unless FLEETPIPE_* or the config file say otherwise."""
    out: dict[str, str] = {}
    for f in dataclasses.fields(cls):
        if f.name == "broker":
            for b in dataclasses.fields(BrokerConfig):
                out[f"broker_{b.name}"] = "none (zeroconf discovery)" if b.name == "url" else _default(b)
        else:
            out[f.name] = _default(f)
    out.update(overrides or {})
    return out


def _default(f: dataclasses.Field) -> str:  # type: ignore[type-arg]
    if f.default is not dataclasses.MISSING:
        value = f.default
    elif f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
    else:
        return "required"
    if value is None or value == "" or value == ():
        return "none"
    if isinstance(value, bool):
        return "on" if value else "off"
    return str(value)
