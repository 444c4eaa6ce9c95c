"""Per-identity broker credentials and the mosquitto ACL of one fleet (``fleetpipe broker gen-creds``).

Every node, the planner, each client and each observer gets its own MQTT username (= its fleetpipe
name, so a node's username is its node id) and a random password. :func:`generate` writes into ``out``::

    <out>/<identity>.password   0600, the password alone; BrokerConfig.password_file on that host
    <out>/planner.key           0600, the planner's Ed25519 signing key (PEM): [planner] signing_key
    <out>/planner.pub           0644, its public key (base64): [node] planner_key = "<contents>" on every node
    <out>/mosquitto/passwd      0600, mosquitto password_file ($7$ = PBKDF2-SHA512 hashes)
    <out>/mosquitto/acl         0600, mosquitto acl_file

``secure.conf`` reads ``{dir}/passwd`` and ``{dir}/acl``: render it with ``dir=<out>/mosquitto``.

What the ACL grants (``F`` = ``fleetpipe/v1/<fleet>``, ``D`` = ``fleetpipe-data/v1/<fleet>`` for the data plane:
frames, part messages, results, slices; everything not listed is denied). The grants are built from the topic
table (:mod:`fleetpipe.topics`: each grant is a spec with some parameters fixed to the identity, the rest
``+``), so moving a topic needs no edit here::

    node n    write F/node/n/state  F/node/n/health  F/node/n/metrics  F/node/n/profile
              read  F/node/n/assign  F/node/n/control  F/plan  F/slice/+/+  F/node/planner/state
              readwrite F/epoch/+/stage/+/in/+            (its stage's frames; the next stage's, any client's)
              read  F/epoch/+/stage/+/part/n/+   write F/epoch/+/stage/+/part/+/n     (split stages: as itself)
              read  F/epoch/+/stage/+/gather/n/+ write F/epoch/+/stage/+/gather/+/n
              write F/result/+  F/error  F/slice/request
    planner   write F/plan  F/node/+/assign  F/slice/+/+  F/error  F/node/planner/metrics  F/node/planner/state
              read  F/node/+/state  F/node/+/assign  F/node/+/health  F/node/+/metrics  F/node/+/profile
              read  F/plan  F/error
              read  F/slice/request
    client c  write D/epoch/+/stage/0/in/c                (frames only as itself)
              read  D/result/c  F/plan  F/error  F/node/planner/state
    observer  read  the control plane and metrics: F/node/+/{state,health,assign,metrics,profile,control},
              F/plan, F/error, D/slice/request; never frames, part messages, results or slices (model weights)
    ha h      read  the control plane as an observer   readwrite homeassistant/#   (Home Assistant and
              `fleetpipe ha-discovery`)

Identity is the topic: a receiver takes who sent a message from the topic level the ACL binds to the
publisher (``fleetpipe.topics.check``), never from the payload. With ``use_username_as_clientid`` in
secure.conf the MQTT client id is the username too, so no identity can take over (kick off) another's
session.

Limits of mosquitto ACLs (they match topics, not payloads or plans), and the trust left in nodes:

* A node may publish to *any* stage input and *any* client's result topic, not only the next stage of
  the plan it is assigned or the client that sent the frame: the broker does not know the plan, and an
  ACL cannot say "reply only to frames you received" (it has no state). A compromised node can
  therefore inject activations into other stages and forge results for any client, but only for frame
  ids it saw (the client accepts a result only for a random 128-bit frame id it has pending) and always
  under the client id of the frame's topic (nodes forward a frame under the client id the first stage
  checked against its topic, and reply only to ``result/<that client>``).
* Any node may read every stage input (it needs the wildcard to follow re-plans), so it sees all frames.
* A node holds a slice only if the planner's Ed25519 signature over its assignment verifies (when the
  node is configured with the planner's public key): a stolen node or client identity, or the broker,
  cannot make a node load a model of its choosing.
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
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from fleetpipe import signing, topics
from fleetpipe.config import validate_name
from fleetpipe.errors import ConfigError

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
    planner_key: Path | None = None  # the planner's signing key (PEM, 0600)
    planner_public_key: str = ""  # its public key (base64), for every node's config (planner_key)


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
    key_file, public = None, ""
    if planner:  # the planner signs what it deploys; nodes configured with planner.pub verify it
        pem, public = signing.generate_keypair()
        key_file = _write_private(out / "planner.key", pem.decode())
        (out / "planner.pub").write_text(public + "\n")
    if broker_user and os.geteuid() == 0 and _user_exists(broker_user):
        shutil.chown(broker_dir, broker_user, None)
        for path in (passwd, acl):
            shutil.chown(path, broker_user, None)
    return Credentials(fleet, passwd, acl, files, roles, "mosquitto_passwd" if binary else "builtin", key_file, public)


def acl_text(fleet: str, roles: dict[str, str]) -> str:
    """The mosquitto acl_file for ``roles`` (identity -> node | planner | client | observer)."""
    validate_name("fleet", fleet)
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
        lines.extend(f"topic {access} {topic}" for access, topic in _grants(fleet, role, name))
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


def _grants(fleet: str, role: str, name: str) -> list[tuple[str, str]]:
    return [(access, spec.format(fleet=fleet) if isinstance(spec, str) else spec.filter(fleet=fleet, **params))
            for access, spec, params in _role_grants(role, name)]


# The data plane (frames, part messages, results, slices = model weights): never granted to observers.
_DATA_PLANE = frozenset({"stage_in", "part_in", "part_gather", "result", "slice_chunk"})


def _role_grants(role: str, name: str) -> list[tuple[str, topics.TopicSpec | str, Mapping[str, object]]]:
    t = topics
    if role == "node":
        me: Mapping[str, object] = {"node_id": name}
        return [
            ("write", t.NODE_STATE, me),
            ("write", t.NODE_HEALTH, me),
            ("write", t.NODE_METRICS, me),
            ("write", t.NODE_PROFILE, me),
            ("read", t.NODE_ASSIGN, me),
            ("read", t.NODE_CONTROL, me),
            ("read", t.PLAN, {}),
            ("readwrite", t.STAGE_IN, {}),  # read: its stage; write: the next one (any, see limits)
            # Split stages: a lead sends part requests to its part nodes and reads their replies on its gather
            # topic; a part node reads its requests and replies to the lead's. The last level is the sender.
            ("read", t.PART_IN, me),
            ("write", t.PART_IN, {"lead": name}),
            ("read", t.PART_GATHER, {"lead": name}),
            ("write", t.PART_GATHER, me),
            ("write", t.RESULT, {}),
            ("write", t.ERROR, {}),
            ("write", t.SLICE_REQUEST, {}),
            ("read", t.SLICE_CHUNK, {}),
            # A node follows only the planner whose birth it sees (PlannerState on the reserved node name).
            ("read", t.NODE_STATE, {"node_id": t.PLANNER_ID}),
        ]
    if role == "planner":
        return [
            ("readwrite", t.PLAN, {}),
            ("readwrite", t.NODE_ASSIGN, {}),  # read: restore an assignment someone overwrote
            ("write", t.SLICE_CHUNK, {}),
            ("readwrite", t.ERROR, {}),
            ("read", t.NODE_STATE, {}),
            ("read", t.NODE_HEALTH, {}),
            ("read", t.NODE_METRICS, {}),
            ("read", t.NODE_PROFILE, {}),
            ("read", t.SLICE_REQUEST, {}),
            ("write", t.NODE_METRICS, {"node_id": t.PLANNER_ID}),  # pipeline metrics (planner/loop.py publishes them)
            ("write", t.NODE_STATE, {"node_id": t.PLANNER_ID}),  # its birth and last-will death (PlannerState)
        ]
    if role == "client":
        return [
            ("write", t.STAGE_IN, {"stage": 0, "client_id": name}),
            ("read", t.RESULT, {"client_id": name}),
            ("read", t.PLAN, {}),
            ("read", t.ERROR, {}),
            ("read", t.NODE_STATE, {"node_id": t.PLANNER_ID}),
        ]
    if role == "ha":  # Home Assistant and `fleetpipe ha-discovery`: the control plane, and HA's discovery topics
        return [("read", t.PREFIX + "/{fleet}/#", {}), ("readwrite", f"{HA_PREFIX}/#", {})]
    # observer: every control-plane topic, never frames, part messages, results or slices (model weights)
    return [("read", spec, {}) for spec in t.SPECS.values() if spec.name not in _DATA_PLANE and not spec.data_plane]


HA_PREFIX = "homeassistant"  # Home Assistant's default discovery prefix (ha-discovery --prefix)


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
            if role == "node" and name == topics.PLANNER_ID:
                raise ConfigError(f"{name!r} is reserved for the planner's state topic; name the node otherwise")
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
