"""The checks of names and references that several modules apply, and the chunking of long lists.

One place for each pattern, so a bureau name, say, is the same everywhere: in a principal's URI, a batch, a limit.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")

#: Bureau, profile, key and auditor names (used with ``fullmatch``).
NAME = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")
#: card_refs, and with their charset batch ids and bundle serials (used with ``fullmatch``).
CARD_REF = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,63}")


def unknown_keys(given: Iterable[str], allowed: Collection[str]) -> list[str]:
    """The keys of ``given`` that are not ``allowed``, sorted (each caller raises its own kind of error)."""
    return sorted(set(given) - set(allowed))


def chunks(items: Iterable[T], size: int) -> Iterator[list[T]]:
    """``items`` in lists of ``size`` (the last one shorter), taken lazily."""
    chunk: list[T] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk
