"""The checks of names, references and public keys that several modules apply, and the chunking of long lists.

One place for each pattern, so a bureau name, say, is the same everywhere: in a principal's URI, a batch, a limit.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Iterable, Iterator
from typing import TypeVar

from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.serialization import load_der_public_key

from kms.errors import InvalidArgument

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


def rsa_public_key(spki: bytes, field: str) -> rsa.RSAPublicKey:
    """A DER SubjectPublicKeyInfo of an RSA key of at least 2048 bits (a station's key a transport key is wrapped
    under); InvalidArgument naming ``field`` otherwise."""
    try:
        key = load_der_public_key(spki)
    except (ValueError, TypeError):  # not DER, or not a public key cryptography knows
        raise InvalidArgument(field, "must be a DER SubjectPublicKeyInfo") from None
    if not isinstance(key, rsa.RSAPublicKey) or key.key_size < 2048:
        raise InvalidArgument(field, "must be an RSA public key of at least 2048 bits")
    return key
