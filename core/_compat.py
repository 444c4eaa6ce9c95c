"""Python 3.10 support (JetPack 6 ships Ubuntu 22.04's Python 3.10): 3.11 features behind one import.

``tomllib`` (the ``tomli`` backport, a conditional dependency before 3.11), ``timeout`` (``asyncio.timeout``;
before 3.11 the ``async-timeout`` backport, raising the builtin ``TimeoutError`` like 3.11 does) and ``StrEnum``.
``wait_for`` is ``asyncio.wait_for`` raising the builtin ``TimeoutError`` on 3.10 too.
``typing.Self`` is only imported under ``TYPE_CHECKING`` (annotations are strings everywhere).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import sys
from collections.abc import AsyncIterator, Awaitable
from typing import TypeVar

__all__ = ["StrEnum", "timeout", "tomllib", "wait_for"]

T = TypeVar("T")

if sys.version_info >= (3, 11):
    from enum import StrEnum

    import tomllib

    timeout = asyncio.timeout
else:  # pragma: no cover - exercised by the 3.10 run of the test command
    import async_timeout
    import tomli as tomllib

    class StrEnum(str, enum.Enum):
        """``enum.StrEnum`` (3.11): members are strings, ``str()`` is the value."""

        def __str__(self) -> str:
            return str(self.value)

    @contextlib.asynccontextmanager
    async def timeout(delay: float | None) -> AsyncIterator[None]:
        """``asyncio.timeout`` (3.11): cancels the block after ``delay`` s and raises the builtin TimeoutError."""
        try:
            async with async_timeout.timeout(delay):
                yield
        except asyncio.TimeoutError as exc:
            raise TimeoutError from exc


async def wait_for(aw: Awaitable[T], timeout_s: float | None) -> T:
    """``asyncio.wait_for`` that raises the builtin ``TimeoutError`` (before 3.11 asyncio had its own class)."""
    try:
        return await asyncio.wait_for(aw, timeout_s)
    except asyncio.TimeoutError as exc:
        if isinstance(exc, TimeoutError):
            raise
        raise TimeoutError from exc
