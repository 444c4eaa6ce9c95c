"""Content addressing and chunking of model slices (shared by the planner, which publishes them, and nodes)."""

from __future__ import annotations

import hashlib

__all__ = ["CHUNK_BYTES", "HASH_CHARS", "chunk", "content_hash"]

HASH_CHARS = 32
# Chunks stay well under 2 MB: bigger MQTT messages hit page-fault cliffs (DESIGN.md).
CHUNK_BYTES = 1 << 20


def content_hash(data: bytes | bytearray | memoryview) -> str:
    """Stable content address of a slice: the first 32 hex chars of its SHA-256."""
    return hashlib.sha256(data).hexdigest()[:HASH_CHARS]


def chunk(data: bytes, size: int = CHUNK_BYTES) -> list[bytes]:
    """Split ``data`` into chunks of at most ``size`` bytes (at least one chunk, possibly empty)."""
    if size < 1:
        raise ValueError("chunk size must be >= 1")
    return [data[i : i + size] for i in range(0, len(data), size)] or [b""]
