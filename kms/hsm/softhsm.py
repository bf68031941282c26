"""Development HSM: SoftHSM2 tokens under a directory of the user's choice, created idempotently.

This module drives softhsm2-util (it does not import pkcs11) and finds the PKCS#11 module on this machine.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
from pathlib import Path

from kms.errors import ConfigError, HsmError
from kms.files import private_dir, write_private

MODULE_CANDIDATES = (
    "/usr/lib/softhsm/libsofthsm2.so",
    "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/local/lib/softhsm/libsofthsm2.so",
    "/usr/lib64/pkcs11/libsofthsm2.so",
    "/usr/lib/x86_64-linux-gnu/libsofthsm2.so",
    "/opt/homebrew/lib/softhsm/libsofthsm2.so",
)


def find_module(explicit: str | None = None) -> str:
    """The PKCS#11 module path: ``explicit`` if given (or 'auto'), else $KMS_PKCS11_MODULE, else SoftHSM2's usual
    install locations."""
    if explicit and explicit != "auto":
        if not Path(explicit).is_file():
            raise ConfigError(f"hsm.module: no PKCS#11 module at {explicit}")
        return explicit
    env = os.environ.get("KMS_PKCS11_MODULE")
    if env:
        return find_module(env)
    for candidate in MODULE_CANDIDATES:
        if Path(candidate).is_file():
            return candidate
    raise ConfigError("hsm.module: SoftHSM2 not found; install softhsm2 or give the module path (--module)")


def write_conf(directory: Path) -> Path:
    """A softhsm2.conf keeping tokens in directory/tokens; returns its path (unchanged if present). Directories
    0700, the file 0600 (SoftHSM2 itself makes its token directories 0700 and object files 0600)."""
    private_dir(directory)
    tokens = private_dir(directory / "tokens")
    conf = directory / "softhsm2.conf"
    if not conf.exists():
        write_private(conf,
                      f"directories.tokendir = {tokens.resolve()}\n"
                      "objectstore.backend = file\n"
                      "log.level = ERROR\n"
                      "slots.removable = false\n")
    return conf


def _util() -> str:
    util = shutil.which("softhsm2-util")
    if util is None:
        raise ConfigError("softhsm2-util not found; install the softhsm2 package")
    return util


def token_labels(conf: Path) -> set[str]:
    out = subprocess.run(
        [_util(), "--show-slots"], env={**os.environ, "SOFTHSM2_CONF": str(conf)},
        capture_output=True, text=True, check=True,
    ).stdout
    labels = set()
    for line in out.splitlines():
        line = line.strip()
        if line.startswith("Label:"):
            label = line.partition(":")[2].strip()
            if label:
                labels.add(label)
    return labels


def new_pin() -> str:
    return secrets.token_hex(12)


def write_secret(path: Path, value: str) -> None:
    write_private(path, value + "\n")


def ensure_token(conf: Path, label: str, pin_file: Path, so_pin_file: Path) -> bool:
    """Create the token with this label unless it exists; PINs are new random values written to the files.
    Returns True if it was created."""
    if label in token_labels(conf):
        return False
    pin, so_pin = new_pin(), new_pin()
    write_secret(pin_file, pin)
    write_secret(so_pin_file, so_pin)
    result = subprocess.run(
        [_util(), "--init-token", "--free", "--label", label, "--pin", pin, "--so-pin", so_pin],
        env={**os.environ, "SOFTHSM2_CONF": str(conf)}, capture_output=True, text=True, check=False,
    )
    if result.returncode != 0:
        raise HsmError(f"softhsm2-util could not create token {label!r} (exit {result.returncode})")
    return True

