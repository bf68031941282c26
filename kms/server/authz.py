"""Method-level authorization as data (kms/policies/authz.yaml): which roles may call which gRPC method.
Default deny; unknown settings and roles are errors at load."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from kms.config import read_policy
from kms.errors import ConfigError, PermissionDenied
from kms.identity import ROLES, Principal
from kms.policies import shipped

DEFAULT_POLICY = shipped("authz.yaml")


@dataclass(frozen=True)
class Policy:
    methods: dict[str, frozenset[str]]
    source: str

    @classmethod
    def load(cls, path: Path = DEFAULT_POLICY) -> Policy:
        methods: dict[str, frozenset[str]] = {}
        for method, roles in read_policy(path, "methods").items():
            if not isinstance(method, str) or not method.startswith("/") or method.count("/") != 2:
                raise ConfigError(f"{path}: {method!r} is not a full gRPC method name (/package.Service/Method)")
            if not isinstance(roles, list) or not roles or any(r not in ROLES for r in roles):
                raise ConfigError(f"{path}: {method}: roles must be a non-empty list of {', '.join(ROLES)}")
            methods[method] = frozenset(roles)
        return cls(methods, str(path))

    def check(self, principal: Principal, method: str) -> None:
        """PermissionDenied, with a reason a person understands, unless the principal's role may call it."""
        roles = self.methods.get(method)
        if roles is None:
            raise PermissionDenied(f"{method} is not open to anyone (no policy entry)")
        if principal.role not in roles:
            raise PermissionDenied(f"{principal} may not call {method} (allowed: {', '.join(sorted(roles))})")

    def missing(self, methods: Iterable[str]) -> list[str]:
        """The methods among these that have no policy entry."""
        return sorted(m for m in methods if m not in self.methods)
