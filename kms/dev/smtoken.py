"""The development SM token: SoftHSM2 built with the project's patch (deploy/softhsm2-sm) adding SM4, SM2 and SM3
under the vendor codes of the ``softhsm2-sm-dev`` mechanism profile.

A development token that checks kms's PKCS#11 calls, not vendor compatibility: real HSMs use codes of their own.
``deploy/softhsm2-sm/build.sh`` (``make sm-token``) builds it into a cache directory named by the hash of the patch
and the script; this module computes the same directory and says whether a finished build is there. It builds
nothing and does not import pkcs11.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from kms.errors import ConfigError

#: The patch, build.sh and README.md (in a checkout; an installed wheel has no deploy/ directory).
BUILD_DIR = Path(__file__).resolve().parents[2] / "deploy" / "softhsm2-sm"
DEFAULT_CACHE = "/var/cache/kms/softhsm2-sm"
#: The cache directory's root (build.sh reads the same variable).
CACHE_ENV = "KMS_SM_TOKEN_CACHE"
#: An explicit module path, used instead of the build in the cache.
MODULE_ENV = "KMS_SM_PKCS11_MODULE"
#: Written by build.sh last: its presence means a finished build.
STAMP = ".kms-sm-token-built"
MODULE = Path("lib") / "softhsm" / "libsofthsm2.so"
UTIL = Path("bin") / "softhsm2-util"


def build_key() -> str | None:
    """The first 16 hex digits of sha256(softhsm2-sm.patch || build.sh), as build.sh computes them; None outside a
    checkout."""
    patch, script = BUILD_DIR / "softhsm2-sm.patch", BUILD_DIR / "build.sh"
    if not (patch.is_file() and script.is_file()):
        return None
    return hashlib.sha256(patch.read_bytes() + script.read_bytes()).hexdigest()[:16]


def prefix() -> Path | None:
    """Where build.sh installs (or installed) the token for the current patch; None outside a checkout."""
    key = build_key()
    if key is None:
        return None
    return Path(os.environ.get(CACHE_ENV) or DEFAULT_CACHE) / key


def built_prefix() -> Path | None:
    """The prefix if it holds a finished build, else None."""
    where = prefix()
    return where if where is not None and (where / STAMP).is_file() else None


def sm_module() -> str | None:
    """The development SM token's PKCS#11 module: $KMS_SM_PKCS11_MODULE if set (it must exist), else the finished
    build for the current patch, else None (not built)."""
    explicit = os.environ.get(MODULE_ENV)
    if explicit:
        if not Path(explicit).is_file():
            raise ConfigError(f"{MODULE_ENV}: no PKCS#11 module at {explicit}")
        return explicit
    where = built_prefix()
    return str(where / MODULE) if where is not None else None


def sm_util() -> str | None:
    """The softhsm2-util installed with that module (next to it: <prefix>/bin), or None."""
    module = sm_module()
    if module is None:
        return None
    util = Path(module).resolve().parents[2] / UTIL
    return str(util) if util.is_file() else None
