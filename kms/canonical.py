"""Canonical JSON: UTF-8, object keys sorted, no insignificant whitespace, only strings, integers, lists and objects.

The one encoding of everything kms signs or hashes: bundle sections (kms.bundle), ceremony proposals, audit records,
card digests. A module of its own so that the audit log and the ceremonies need not import the bundle format.
"""

from __future__ import annotations

import json
from typing import Any


def canonical(value: Any) -> bytes:
    """The canonical encoding of a JSON value made of str, int, list and dict."""
    _check_types(value)
    return _dumps(value)


def _check_types(value: Any) -> None:
    if isinstance(value, bool) or value is None or isinstance(value, float):
        raise TypeError("canonical JSON here holds only str, int, list and dict")
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, str):
                raise TypeError("object keys must be strings")
            _check_types(v)
    elif isinstance(value, list):
        for v in value:
            _check_types(v)
    elif not isinstance(value, str | int):
        raise TypeError(f"cannot encode {type(value).__name__}")


def _dumps(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
