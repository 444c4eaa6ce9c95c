"""Per-identity broker credentials and the mosquitto ACL of one fleet (``fleetpipe broker gen-creds``).

Every node, the planner, each client and each observer gets its own MQTT username (= its fleetpipe
name, so a node's username is its node id) and a random password. :func:`generate` writes into ``out``::

    <out>/<identity>.password   0600, the password alone; BrokerConfig.password_file on that host
    <out>/mosquitto/passwd      0600, mosquitto password_file ($7$ = PBKDF2-SHA512 hashes)
    <out>/mosquitto/acl         0600, mosquitto acl_file

``secure.conf`` reads ``{dir}/passwd`` and ``{dir}/acl``: render it with ``dir=<out>/mosquitto``.

What the ACL grants (``F`` = ``fleetpipe/v1/<fleet>``; everything not listed is denied; the data-plane topics
``F/epoch/...``, ``F/result/...`` and ``F/slice/...`` below live under ``fleetpipe-data/v1/<fleet>`` instead, see
:mod:`fleetpipe.topics`; an observer reads ``#`` of both)::

    node n    write F/node/n/state  F/node/n/health  F/node/n/metrics  F/node/n/profile
              write F/epoch/+/stage/+/in  F/result/+  F/error  F/slice/request
              write F/epoch/+/stage/+/part/+  F/epoch/+/stage/+/gather/+     (split stages)
              read  F/node/n/assign  F/epoch/+/stage/+/in  F/slice/+/+
              read  F/epoch/+/stage/+/part/n  F/epoch/+/stage/+/gather/n
    planner   write F/plan  F/node/+/assign  F/slice/+/+  F/error  F/node/planner/metrics
              read  F/node/+/state  F/node/+/health  F/node/+/metrics  F/node/+/profile  F/plan  F/error
              read  F/slice/request
    ha h      read  F/#   readwrite homeassistant/#   (Home Assistant itself and `fleetpipe ha-discovery`)
    client c  write F/epoch/+/stage/0/in
              read  F/result/c  F/plan  F/error
    observer  read  F/#

Limits of mosquitto ACLs (they match topics, not payloads or plans):

* A node may publish to *any* stage input and *any* client's result topic, not only the next stage of
  the plan it is assigned or the client that sent the frame: the broker does not know the plan. A
  compromised node can therefore inject activations into other stages and forge results; receivers
  must check epochs, frame ids and stage numbers (the wire layer does) and nodes must only publish
  results to ``result/<client>`` topics of their fleet, never to an arbitrary ``reply_to``.
* Any node may read every stage input (it needs the wildcard to follow re-plans), so it sees all frames.
* Any node may send a part request to any node and a part reply to any lead (split stages); a part
  node answers only the parts it holds for the lead and epoch of its assignment, a lead accepts only
  replies to requests it sent.
* Anyone may publish an ``error`` report; error reports are informational, never trusted.
* ACLs do not limit rate or size: ``max_packet_size`` in secure.conf bounds one message.
* The username is the identity: one password file per host, never shared between nodes.
"""

from __future__ import annotations

import base64
import hashlib
import os
import pwd
import secrets
import shutil
import subprocess
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from fleetpipe.config import validate_name
from fleetpipe.errors import ConfigError
from fleetpipe.topics import DATA_PREFIX, PREFIX, SPECS

__all__ = ["Credentials", "acl_text", "generate", "hash_password", "verify_password"]

ITERATIONS = 101  # mosquitto_passwd's default; passwords are 256-bit random, so stretching adds nothing
_SALT_BYTES = 12


@dataclass(frozen=True, slots=True)
class Credentials:
    """What :func:`generate` wrote: the broker's files and one password file per identity."""

    fleet: str
    passwd_file: Path
    acl_file: Path
    password_files: dict[str, Path] = field(default_factory=dict)
    roles: dict[str, str] = field(default_factory=dict)  # identity -> node | planner | client | observer
    hasher: str = "mosquitto_passwd"  # or "builtin"


def generate(
    out: str | Path,
    *,
    fleet: str,
    nodes: Sequence[str],
    planner: str | None = "planner",
    clients: Sequence[str] = (),
    observers: Sequence[str] = (),
    ha: Sequence[str] = (),
    mosquitto_passwd: str | None = "auto",
    broker_user: str | None = None,
) -> Credentials:
    """Make random passwords, the mosquitto password file and the ACL under ``out``.

    ``mosquitto_passwd``: ``"auto"`` uses the binary when installed (``-U``, so passwords never appear
    in argv), a path uses that binary, None hashes in Python (same ``$7$`` format). ``broker_user``:
    when running as root, chown ``<out>/mosquitto`` to this user (mosquitto reads the files after
    dropping privileges).
    """
    roles = _roles(fleet, nodes, planner, clients, observers, ha)
    out = Path(out)
    broker_dir = out / "mosquitto"
    broker_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(broker_dir, 0o700)
    passwords = {name: secrets.token_urlsafe(32) for name in roles}
    files: dict[str, Path] = {}
    for name, password in passwords.items():
        files[name] = _write_private(out / f"{name}.password", password + "\n")
    passwd = broker_dir / "passwd"
    binary = shutil.which("mosquitto_passwd") if mosquitto_passwd == "auto" else mosquitto_passwd
    if binary:
        _write_private(passwd, "".join(f"{u}:{p}\n" for u, p in passwords.items()))
        proc = subprocess.run([binary, "-U", str(passwd)], capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            passwd.unlink(missing_ok=True)  # it holds clear-text passwords
            raise ConfigError(f"mosquitto_passwd -U failed: {(proc.stderr or proc.stdout).strip()}")
    else:
        _write_private(passwd, "".join(f"{u}:{hash_password(p)}\n" for u, p in passwords.items()))
    acl = _write_private(broker_dir / "acl", acl_text(fleet, roles))
    if broker_user and os.geteuid() == 0 and _user_exists(broker_user):
        shutil.chown(broker_dir, broker_user, None)
        for path in (passwd, acl):
            shutil.chown(path, broker_user, None)
    return Credentials(fleet, passwd, acl, files, roles, "mosquitto_passwd" if binary else "builtin")


def acl_text(fleet: str, roles: dict[str, str]) -> str:
    """The mosquitto acl_file for ``roles`` (identity -> node | planner | client | observer)."""
    f = f"{PREFIX}/{validate_name('fleet', fleet)}"
    d = f"{DATA_PREFIX}/{fleet}"
    lines = [
        f"# fleetpipe ACL for fleet {fleet!r}, written by `fleetpipe broker gen-creds`.",
        "# Username = fleetpipe identity. Anything not granted here is denied (anonymous: nothing).",
        "# Limits: a node may publish to any stage input and any result topic of the fleet (see",
        "# fleetpipe.deploy.creds). Regenerate or append a `user` block when adding an identity.",
        "",
    ]
    for name, role in roles.items():
        lines.append(f"# {role}")
        lines.append(f"user {name}")
        lines.extend(f"topic {access} {_plane(topic, f, d)}" for access, topic in _grants(f, role, name))
        lines.append("")
    return "\n".join(lines)


def hash_password(password: str, *, salt: bytes | None = None, iterations: int = ITERATIONS) -> str:
    """A mosquitto ``$7$`` hash: ``$7$<iterations>$<b64 salt>$<b64 PBKDF2-HMAC-SHA512(password, salt)>``."""
    salt = secrets.token_bytes(_SALT_BYTES) if salt is None else salt
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations, 64)
    return f"$7${iterations}${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"


def verify_password(password: str, hashed: str) -> bool:
    """Whether ``hashed`` (a ``$7$`` entry, as mosquitto_passwd writes) matches ``password``."""
    parts = hashed.split("$")
    if len(parts) != 5 or parts[1] != "7":
        raise ValueError("not a mosquitto $7$ hash")
    expected = hash_password(password, salt=base64.b64decode(parts[3]), iterations=int(parts[2]))
    return secrets.compare_digest(expected, hashed)


# --- private helpers --------------------------------------------------------------------------------


def _grants(f: str, role: str, name: str) -> list[tuple[str, str]]:
    if role == "node":
        return [
            ("write", f"{f}/node/{name}/state"),
            ("write", f"{f}/node/{name}/health"),
            ("write", f"{f}/node/{name}/metrics"),
            ("write", f"{f}/node/{name}/profile"),
            ("readwrite", f"{f}/epoch/+/stage/+/in"),  # read: its stage; write: the next one (any, see limits)
            # Split stages: a lead sends part requests to its part nodes and reads their replies on its gather
            # topic; a part node reads its requests and replies to the lead's gather topic.
            ("read", f"{f}/epoch/+/stage/+/part/{name}"),
            ("write", f"{f}/epoch/+/stage/+/part/+"),
            ("read", f"{f}/epoch/+/stage/+/gather/{name}"),
            ("write", f"{f}/epoch/+/stage/+/gather/+"),
            ("write", f"{f}/result/+"),
            ("write", f"{f}/error"),
            ("write", f"{f}/slice/request"),
            ("read", f"{f}/node/{name}/assign"),
            ("read", f"{f}/slice/+/+"),
        ]
    if role == "planner":
        return [
            ("readwrite", f"{f}/plan"),
            ("write", f"{f}/node/+/assign"),
            ("write", f"{f}/slice/+/+"),
            ("readwrite", f"{f}/error"),
            ("read", f"{f}/node/+/state"),
            ("read", f"{f}/node/+/health"),
            ("read", f"{f}/node/+/metrics"),
            ("read", f"{f}/node/+/profile"),
            ("read", f"{f}/slice/request"),
            ("write", f"{f}/node/planner/metrics"),  # pipeline metrics (planner/loop.py publishes them there)
        ]
    if role == "client":
        return [
            ("write", f"{f}/epoch/+/stage/0/in"),
            ("read", f"{f}/result/{name}"),
            ("read", f"{f}/plan"),
            ("read", f"{f}/error"),
        ]
    if role == "ha":  # Home Assistant and `fleetpipe ha-discovery`: the control plane, and HA's discovery topics
        return [("read", f"{f}/#"), ("readwrite", f"{HA_PREFIX}/#")]
    return [("read", f"{f}/#"), ("read", f"{f}/{_DATA_ALL}")]  # observer: control plane and data plane


HA_PREFIX = "homeassistant"  # Home Assistant's default discovery prefix (ha-discovery --prefix)
_DATA_ALL = "<data>/#"  # placeholder _plane() maps to the data prefix's "#"
_DATA_ROOTS = frozenset(spec.pattern.split("/")[3] for spec in SPECS.values() if spec.data_plane)


def _plane(topic: str, f: str, d: str) -> str:
    """A grant written under ``f`` moved to the data prefix ``d`` when it names a data-plane topic."""
    rest = topic.removeprefix(f + "/")
    if rest == _DATA_ALL:
        return f"{d}/#"
    return f"{d}/{rest}" if rest != topic and rest.split("/")[0] in _DATA_ROOTS else topic


def _roles(fleet: str, nodes: Iterable[str], planner: str | None, clients: Iterable[str],
           observers: Iterable[str], ha: Iterable[str] = ()) -> dict[str, str]:
    validate_name("fleet", fleet)
    roles: dict[str, str] = {}
    groups = [("node", list(nodes)), ("planner", [planner] if planner else []), ("client", list(clients)),
              ("observer", list(observers)), ("ha", list(ha))]
    for role, names in groups:
        for name in names:
            validate_name(f"{role} name", name)
            if name in roles:
                raise ConfigError(f"identity {name!r} given twice ({roles[name]} and {role})")
            roles[name] = role
    if not roles:
        raise ConfigError("no identities: give --nodes, --planner or --clients")
    return roles


def _write_private(path: Path, text: str) -> Path:
    """Write ``text`` to ``path`` created 0600 (never world-readable, not even briefly)."""
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    return path


def _user_exists(user: str) -> bool:
    try:
        pwd.getpwnam(user)
    except KeyError:
        return False
    return True
