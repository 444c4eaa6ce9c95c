"""Ed25519 signatures over stage assignments: the planner signs what it deploys, nodes verify before loading.

The ACL lets only the planner's identity publish assignments, but a stolen planner password, or the
broker itself, could still name any slice: its hash only proves the slice is the one the assignment
names. So the planner signs each :class:`~fleetpipe.wire.StageAssign` with its private key
(``fleetpipe broker gen-creds`` writes ``planner.key``, 0600, and ``planner.pub``), and a node whose
config holds the public key (``[node] planner_key = "<planner.pub>"``) refuses an assignment that is
unsigned or whose signature does not verify, before it fetches or loads anything.

What is signed: ``DOMAIN`` + the assignment's canonical JSON without its ``signature`` field (keys
sorted, no spaces), i.e. fleet, epoch, node, stage, slice hash (sha256) and size, model id, layers,
names, bits, split parts (with their slice hashes) and exit cache: everything the node acts on. A
signed assignment is bound to its fleet, node and epoch; replaying an older one (same planner, same
fleet) can only bring back a slice the planner once deployed to that node, and the node ignores
epochs older than the one it runs.

Keys: the private key is PKCS#8 PEM; the public key is the raw 32 bytes in base64 (one short line for a
TOML file). ``cryptography`` provides Ed25519.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import json
from pathlib import Path
from typing import Any

from fleetpipe import wire
from fleetpipe.errors import ConfigError, UntrustedSlice

__all__ = ["DOMAIN", "generate_keypair", "load_private_key", "load_public_key", "sign_assign", "verify_assign"]

DOMAIN = b"fleetpipe-stage-assign-v1\n"


def generate_keypair() -> tuple[bytes, str]:
    """A new Ed25519 key pair: (private key as PKCS#8 PEM, public key as base64 of its 32 raw bytes)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return pem, base64.b64encode(raw).decode()


def load_private_key(path: str | Path) -> Any:
    """The planner's signing key from its PEM file; ConfigError if unreadable or not Ed25519."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    try:
        key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise ConfigError(f"cannot read the planner's signing key {path}: {exc}") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise ConfigError(f"{path} is not an Ed25519 private key")
    return key


def load_public_key(text: str) -> Any:
    """The planner's public key from its base64 text (``planner.pub``); ConfigError if malformed."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    try:
        raw = base64.b64decode(text.strip(), validate=True)
        return Ed25519PublicKey.from_public_bytes(raw)
    except (binascii.Error, ValueError) as exc:
        raise ConfigError(f"planner_key is not a base64 Ed25519 public key: {exc}") from exc


def sign_assign(assign: wire.StageAssign, key: Any) -> wire.StageAssign:
    """``assign`` with its ``signature`` set (base64 Ed25519 over DOMAIN + canonical JSON)."""
    signature = key.sign(_signed_bytes(assign))
    return dataclasses.replace(assign, signature=base64.b64encode(signature).decode())


def verify_assign(assign: wire.StageAssign, public_key: Any) -> None:
    """Raise UntrustedSlice unless ``assign`` carries a valid signature of ``public_key``'s planner."""
    from cryptography.exceptions import InvalidSignature

    if not assign.signature:
        raise UntrustedSlice(f"unsigned assignment of epoch {assign.epoch} refused (this node requires the "
                             f"planner's signature)")
    try:
        public_key.verify(base64.b64decode(assign.signature, validate=True), _signed_bytes(assign))
    except (InvalidSignature, binascii.Error, ValueError):
        raise UntrustedSlice(f"assignment of epoch {assign.epoch} with a bad signature refused (not signed by "
                             f"this fleet's planner)") from None


def _signed_bytes(assign: wire.StageAssign) -> bytes:
    body = json.loads(wire.encode(dataclasses.replace(assign, signature="")))
    body.pop("signature", None)
    return DOMAIN + json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()
