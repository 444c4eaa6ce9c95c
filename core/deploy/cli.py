"""``fleetpipe install-service``, ``fleetpipe broker gen-creds`` and ``fleetpipe broker gen-certs``.

Cheap to import: the work happens in fleetpipe.deploy.install / creds / certs when a command runs.
No secret is ever taken on the command line (``ps`` shows argv): passwords are generated into files
and only file paths are passed around.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

__all__ = ["register"]


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``install-service`` and the ``broker gen-creds`` / ``broker gen-certs`` verbs."""
    p = subparsers.add_parser(
        "install-service", help="write the systemd unit and /etc/fleetpipe config for this host",
        description="Write a hardened systemd unit (ExecStart = this fleetpipe) and the config for this host.")
    p.add_argument("--role", choices=("node", "planner"), default="node")
    p.add_argument("--name", help="node name (default: host name); with --template, the instance name")
    p.add_argument("--template", action="store_true",
                   help="node only: install fleetpipe-node@.service and node-NAME.toml (several nodes per host)")
    p.add_argument("--fleet", default="default", help="fleet name (default: 'default')")
    p.add_argument("--broker", help="mqtt://host:1883 or mqtts://host:8883 (default: discover with zeroconf)")
    p.add_argument("--username", help="broker username (default: the node name, or 'planner')")
    p.add_argument("--password-file", help="password file from `fleetpipe broker gen-creds`; copied to /etc/fleetpipe")
    p.add_argument("--ca-certs", help="CA certificate (ca.crt from `fleetpipe broker gen-certs`); copied, enables TLS")
    p.add_argument("--model", help="planner only: ONNX model path (default /var/lib/fleetpipe/model.onnx)")
    p.add_argument("--planner-key", help="node only: planner.pub from `broker gen-creds`; the node then loads only "
                                         "assignments the planner signed")
    p.add_argument("--signing-key", help="planner only: planner.key from `broker gen-creds`; copied to /etc/fleetpipe, "
                                         "signs every assignment")
    p.add_argument("--prefix", default="/", help="install under this root instead of / (image builds, tests)")
    p.add_argument("--force", action="store_true", help="overwrite an existing config file")
    p.add_argument("--dry-run", action="store_true", help="print the files instead of writing them")
    p.set_defaults(func=_install_service)

    broker = _broker_group(subparsers)
    g = broker.add_parser("gen-creds", help="per-identity passwords, mosquitto password file and ACL",
                          description="Generate a random password per node/planner/client, the mosquitto "
                                      "password file and the ACL of one fleet.")
    g.add_argument("--fleet", required=True)
    g.add_argument("--nodes", default="", help="comma-separated node names (= their MQTT usernames)")
    g.add_argument("--planner", default="planner", help="planner identity (default 'planner'; '' for none)")
    g.add_argument("--clients", default="", help="comma-separated client ids (they read result/<client-id>)")
    g.add_argument("--observers", default="", help="comma-separated read-only identities (dashboards)")
    g.add_argument("--ha", default="", help="comma-separated Home Assistant identities (HA itself and "
                                            "`fleetpipe ha-discovery`: read the control plane, write homeassistant/#)")
    g.add_argument("--out", required=True, help="directory to write into (created)")
    g.add_argument("--builtin-hash", action="store_true",
                   help="hash in Python even if mosquitto_passwd is installed")
    g.add_argument("--broker-user", default="mosquitto",
                   help="when root, chown OUT/mosquitto to this user (default mosquitto; '' to skip)")
    g.set_defaults(func=_gen_creds)

    c = broker.add_parser("gen-certs", help="a private CA and a TLS certificate for the broker (openssl)",
                          description="Create (or reuse) OUT/ca.crt + ca.key and a broker certificate.")
    c.add_argument("--out", required=True)
    c.add_argument("--host", action="append", required=True, dest="hosts",
                   help="address or DNS name nodes use for the broker (repeatable)")
    c.add_argument("--days", type=int, default=825, help="server certificate validity (default 825)")
    c.add_argument("--broker-user", default="mosquitto",
                   help="when root, chown the broker's files to this user (default mosquitto; '' to skip)")
    c.set_defaults(func=_gen_certs)

    r = broker.add_parser("config", help="print (or write) a mosquitto config for fleetpipe",
                          description="Render a shipped mosquitto config: lab (loopback, anonymous) or secure "
                                      "(TLS + passwords + ACL from `gen-certs`/`gen-creds` --out DIR/mosquitto).")
    r.add_argument("--secure", action="store_true", help="the TLS + password + ACL config")
    r.add_argument("--dir", help="secure: the directory holding ca.crt, server.crt/key, passwd, acl")
    r.add_argument("--port", type=int, help="listener port (default 8883 secure, 1883 lab)")
    r.add_argument("--bind", default=None, help="listener address (default 0.0.0.0 secure, 127.0.0.1 lab)")
    r.add_argument("-o", "--output", help="write here (e.g. /etc/mosquitto/conf.d/fleetpipe.conf)")
    r.set_defaults(func=_broker_config)


# --- private helpers --------------------------------------------------------------------------------


def _broker_group(
    subparsers: argparse._SubParsersAction[argparse.ArgumentParser],
) -> argparse._SubParsersAction[argparse.ArgumentParser]:
    try:
        from fleetpipe.discovery_cli import broker_subparsers
    except ImportError:  # pragma: no cover - discovery_cli is part of the same distribution
        parser = subparsers.choices.get("broker") or subparsers.add_parser("broker", help="broker helpers")
        return parser.add_subparsers(dest="broker_command", metavar="BROKER_COMMAND")
    return broker_subparsers(subparsers)


def _split(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def _install_service(args: argparse.Namespace) -> int:
    from fleetpipe.deploy import install
    from fleetpipe.errors import ConfigError

    if args.role == "planner" and (args.template or args.name):
        print("fleetpipe install-service: --name/--template are for --role node", file=sys.stderr)
        return 2
    try:
        files = install.plan(args.role, name=args.name, template=args.template, fleet=args.fleet,
                             broker=args.broker, username=args.username, password_file=args.password_file,
                             ca_certs=args.ca_certs, model=args.model, prefix=args.prefix,
                             planner_key=args.planner_key, signing_key=args.signing_key)
    except ConfigError as exc:
        print(f"fleetpipe install-service: {exc}", file=sys.stderr)
        return 2
    if args.dry_run:
        for f in files:
            shown = "<secret, not shown>" if f.path.name.endswith((".password", ".key")) else f.text.rstrip()
            print(f"--- {f.path} (mode {f.mode:04o})\n{shown}\n")
        return 0
    try:
        # The service user first: the config and password files are chowned to its group as they are written.
        done = install.apply(files[1:2], force=args.force, prefix=args.prefix)
        created = install.create_user(files[1].path, args.prefix)
        done += install.apply([files[0], *files[2:]], force=args.force, prefix=args.prefix)
    except (OSError, ConfigError) as exc:
        print(f"fleetpipe install-service: {exc}", file=sys.stderr)
        return 1
    for f, what in done:
        note = {"kept": "  (exists; --force to overwrite)", "fixed": "  (exists; owner/mode mended)"}.get(what, "")
        print(f"{what:7} {f.path}{note}")
    if created:
        print(f"created the fleetpipe system user: {created}")
    unit = install.unit_name(args.role, args.name, template=args.template)
    exec_line = next(line for line in files[0].text.splitlines() if line.startswith("ExecStart="))
    if "/home/" in exec_line or "/root/" in exec_line:
        print("warning: fleetpipe is installed under a home directory; the 'fleetpipe' user must be able to "
              "read it (ProtectHome=read-only is set). A venv under /opt/fleetpipe is better.")
    sysusers = "" if created else "  sudo systemd-sysusers   # creates the 'fleetpipe' user\n"
    print(f"\nnext:\n{sysusers}  sudo systemctl daemon-reload && sudo systemctl enable --now {unit}\n"
          f"  journalctl -u {unit} -f")
    return 0


def _gen_creds(args: argparse.Namespace) -> int:
    from fleetpipe.deploy import creds
    from fleetpipe.errors import ConfigError

    try:
        result = creds.generate(args.out, fleet=args.fleet, nodes=_split(args.nodes), planner=args.planner or None,
                                clients=_split(args.clients), observers=_split(args.observers), ha=_split(args.ha),
                                mosquitto_passwd=None if args.builtin_hash else "auto",
                                broker_user=args.broker_user or None)
    except (ConfigError, OSError) as exc:
        print(f"fleetpipe broker gen-creds: {exc}", file=sys.stderr)
        return 1
    print(f"mosquitto password_file: {result.passwd_file}  ({result.hasher})")
    print(f"mosquitto acl_file:      {result.acl_file}")
    for name, path in result.password_files.items():
        print(f"{result.roles[name]:8} {name}: username {name}, password_file {path}")
    if result.planner_key is not None:
        print(f"planner signing key:     {result.planner_key}  ([planner] signing_key = \"<its path>\")")
        print(f"planner public key:      planner_key = \"{result.planner_public_key}\"  (every node's [node] table;"
              " nodes then refuse unsigned assignments)")
    print("\ncopy each <name>.password to its host (install-service --password-file copies it to /etc/fleetpipe);"
          f"\nrender secure.conf with dir={result.passwd_file.parent} for the broker.")
    return 0


def _gen_certs(args: argparse.Namespace) -> int:
    from fleetpipe.deploy import certs
    from fleetpipe.errors import ConfigError

    try:
        files = certs.generate(args.out, args.hosts, days=args.days, broker_user=args.broker_user or None)
    except (ConfigError, OSError) as exc:
        print(f"fleetpipe broker gen-certs: {exc}", file=sys.stderr)
        return 1
    print(f"CA certificate (ca_certs on every host): {files.ca_cert}")
    print(f"CA key (keep it safe, off the broker):   {files.ca_key}")
    print(f"broker certificate and key:              {files.server_cert}, {files.server_key}")
    return 0


def _broker_config(args: argparse.Namespace) -> int:

    from fleetpipe.deploy import broker_config

    if args.secure and not args.dir:
        print("fleetpipe broker config: --secure needs --dir (gen-creds/gen-certs --out DIR: DIR/mosquitto)",
              file=sys.stderr)
        return 2
    name = "secure.conf" if args.secure else "lab.conf"
    port = args.port or (8883 if args.secure else 1883)
    bind = args.bind or ("0.0.0.0" if args.secure else "127.0.0.1")
    text = broker_config.render(name, port=port, bind=bind, dir=str(Path(args.dir).resolve()) if args.dir else "")
    if args.output:
        Path(args.output).write_text(text)
        print(f"wrote {args.output}; restart mosquitto to apply")
    else:
        print(text, end="")
    return 0
