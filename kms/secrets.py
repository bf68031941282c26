"""Secrets (PINs, passwords) are given by reference, never as literals in configuration.

A reference is ``env:NAME`` (an environment variable) or ``file:PATH`` (a file holding the secret on its first
line; a relative path is taken from the configuration file's directory). Resolution happens only in the process that
needs the secret, e.g. a domain's HSM worker, never in a front end.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from kms.errors import ConfigError

SCHEMES = ("env", "file")


@dataclass(frozen=True)
class SecretRef:
    scheme: str
    target: str

    @classmethod
    def parse(cls, text: str, *, base_dir: Path | None = None, field: str = "pin") -> SecretRef:
        scheme, sep, target = text.partition(":")
        if not sep or scheme not in SCHEMES or not target:
            raise ConfigError(
                f"{field}: must be a reference 'env:NAME' or 'file:PATH', never a literal secret"
            )
        if scheme == "file" and base_dir is not None and not os.path.isabs(target):
            target = str(base_dir / target)
        return cls(scheme, target)

    def resolve(self) -> str:
        """The secret's value. Errors name the reference, never the value."""
        if self.scheme == "env":
            value = os.environ.get(self.target)
            if value is None or value == "":
                raise ConfigError(f"secret reference {self}: environment variable is not set")
            return value
        try:
            text = Path(self.target).read_bytes().decode("utf-8")
        except OSError as exc:
            raise ConfigError(f"secret reference {self}: cannot read file ({exc.strerror})") from None
        except UnicodeDecodeError:
            raise ConfigError(f"secret reference {self}: file is not UTF-8 text") from None
        value = text.splitlines()[0].strip() if text.strip() else ""
        if not value:
            raise ConfigError(f"secret reference {self}: file is empty")
        return value

    def __str__(self) -> str:
        return f"{self.scheme}:{self.target}"
