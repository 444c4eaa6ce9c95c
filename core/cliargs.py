"""Broker connection options shared by the client-side commands (``infer``, ``top``, ``timeline``, ...).

The daemons read a full ``NodeConfig``/``PlannerConfig``; these commands only need a ``BrokerConfig``.
Secrets never come from argv (``ps`` shows it): a password is read from ``--password-file`` or from the
``password_file`` of the ``[broker]`` table in ``--config``.
"""

from __future__ import annotations

import argparse
import dataclasses
import tomllib
from pathlib import Path

from fleetpipe.config import BrokerConfig
from fleetpipe.errors import ConfigError

__all__ = ["DEFAULT_URL", "add_broker_args", "broker_from_args"]

DEFAULT_URL = "mqtt://127.0.0.1:1883"
_KEYS = ("url", "username", "password_file", "ca_certs", "certfile", "keyfile")


def add_broker_args(p: argparse.ArgumentParser, *, required: bool = False) -> None:
    """``--broker``, ``--config`` and the credential options."""
    p.add_argument("--broker", required=required,
                   help=f"broker URL, mqtts:// for TLS (default: the config file's, else {DEFAULT_URL})")
    p.add_argument("--config", help="TOML file whose [broker] table gives url, username, password_file, ca_certs")
    p.add_argument("--username", help="MQTT username (secure broker: this identity from `broker gen-creds`)")
    p.add_argument("--password-file", dest="password_file", help="file holding the MQTT password")
    p.add_argument("--ca-certs", dest="ca_certs", help="CA bundle to verify the broker's TLS certificate")


def broker_from_args(args: argparse.Namespace) -> BrokerConfig:
    """The ``BrokerConfig`` from ``--config`` (its ``[broker]`` table), then the flags (flags win)."""
    values: dict[str, object] = {}
    if getattr(args, "config", None):
        try:
            table = tomllib.loads(Path(args.config).read_text()).get("broker", {})
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"cannot read config {args.config}: {exc}") from exc
        if not isinstance(table, dict):
            raise ConfigError(f"{args.config}: [broker] must be a table")
        values.update({k: str(v) for k, v in table.items() if k in _KEYS})
    for key, flag in (("url", "broker"), ("username", "username"), ("password_file", "password_file"),
                      ("ca_certs", "ca_certs")):
        value = getattr(args, flag, None)
        if value is not None:
            values[key] = value
    values.setdefault("url", DEFAULT_URL)
    return dataclasses.replace(BrokerConfig(), **values)  # type: ignore[arg-type]
