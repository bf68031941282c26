"""Token and object labels: the one place where the names kms gives tokens and the objects in them are built.

A token is found by its label (CKA_LABEL of the token info), a key by its object label (CKA_LABEL); both are part of
a deployment's state (a registry row names a key's label, a configuration a token's), so changing a format here is a
migration, not a refactoring. No pkcs11 import: the registry, the station, the dev home and the CLI use these.

Tokens (the development home's layout; production configurations name theirs freely):
  ``kms-<domain>``     a key domain's token (``kms-hrss``, ``kms-bank``)
  ``kms-audit``        the audit signer's token
  ``kms-<station>``    a station's token
  ``kms-selftest``     the throw-away token of ``kms selftest``

Objects:
  ``kms/<domain>/<kind>/<name>/v<version>``   a registered key (master, transport, signing, custody, data, index)
  ``<custody label>/trusted``                  the SO-trusted public half of a custody key (escrow wraps under it)
  ``kms/audit/signing/audit/v1``               the audit signer's key; ``kms/audit/signed-head`` its remembered head
  ``kms/station/<station>/unwrap/<domain>/<id>``  a station's single-use RSA pair one transport key is wrapped to
  ``card/<card_ref>/<domain>/<name>``          a card key a station keeps in its token (``bundle open --store``)
  ``kms/selftest/<purpose>/<random>``          session objects of the self-test
"""

from __future__ import annotations

import secrets

AUDIT_TOKEN = "kms-audit"
SELFTEST_TOKEN = "kms-selftest"
AUDIT_KEY = "kms/audit/signing/audit/v1"
AUDIT_SIGNED_HEAD = "kms/audit/signed-head"


def domain_token(domain: str) -> str:
    """The development token of a key domain."""
    return f"kms-{domain}"


def station_token(station: str) -> str:
    """The development token of a station."""
    return f"kms-{station}"


def key_label(domain: str, kind: str, name: str, version: int) -> str:
    """A registered key: ``kms/<domain>/<kind>/<name>/v<version>`` (``kind`` a registry KeyKind value)."""
    return f"kms/{domain}/{kind}/{name}/v{version}"


def trusted_label(custody_label: str) -> str:
    """The SO-trusted public half of a custody key, the one key escrowable keys may be wrapped under."""
    return f"{custody_label}/trusted"


def unwrap_key_label(station: str, domain: str, handoff: str = "") -> str:
    """A station's RSA key pair that one transport key of a domain is wrapped to (``handoff``: the pair's own random
    id; without it, the long-lived pair of the kms before single-use hand-off keys, still accepted once)."""
    return f"kms/station/{station}/unwrap/{domain}" + (f"/{handoff}" if handoff else "")


def card_key_label(card_ref: str, domain: str, name: str) -> str:
    """A card key a station stores in its token."""
    return f"card/{card_ref}/{domain}/{name}"


def selftest_label(purpose: str) -> str:
    """A fresh, unique label for a self-test session object."""
    return f"kms/selftest/{purpose}/{secrets.token_hex(8)}"
