"""Files at rest: everything kms writes is its owner's alone, whatever the umask.

Homes hold PINs, private keys and card data (``kms.db``, station ledgers, fetched bundles, card files), so every
file kms creates is 0600 and every directory 0700. Two layers: the command line and ``kms serve`` set the umask to 077
(kms.cli.main.main, kms.server.serve.serve; worker processes inherit it), and the code paths here create with explicit
modes and then set them (a umask can only take bits away, and an odd one could take the owner's), so library callers get
the same. An existing directory that kms did not create (an ``--out`` the user chose, /tmp) keeps its mode; the files
kms writes into it are still 0600.
"""

from __future__ import annotations

import errno
import os
import secrets
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import yaml

from kms.errors import ConfigError, InvalidArgument

PRIVATE_FILE = 0o600
PRIVATE_DIR = 0o700
#: The umask of kms processes: nothing for group or others.
UMASK = 0o077


def restrict_umask() -> int:
    """Set the process umask to 077 (inherited by processes started from here); returns the previous one."""
    return os.umask(UMASK)


def private_dir(path: Path) -> Path:
    """``path`` as a directory, creating it and any missing parents 0700. Existing directories are left alone."""
    missing: list[Path] = []
    current = path
    while not current.exists():
        missing.append(current)
        if current.parent == current:
            break
        current = current.parent
    for directory in reversed(missing):
        try:
            directory.mkdir(mode=PRIVATE_DIR)
        except FileExistsError:  # made by someone else meanwhile: theirs
            continue
        os.chmod(directory, PRIVATE_DIR)
    if not path.is_dir():
        raise NotADirectoryError(f"{path} is not a directory")
    return path


def _restrict(fd: int) -> None:
    if stat.S_ISREG(os.fstat(fd).st_mode):  # never chmod a device such as /dev/null
        os.fchmod(fd, PRIVATE_FILE)


@contextmanager
def open_private(path: Path, mode: str = "w", *, exclusive: bool = False, **kwargs: Any) -> Iterator[IO[Any]]:
    """Open ``path`` for writing ("w" or "wb"), created 0600; a regular file that existed is truncated and made 0600.
    With ``exclusive``, an existing file is an error (FileExistsError). Missing parents are created 0700. A symbolic
    link at ``path`` is not followed (InvalidArgument naming the path): one planted in a shared directory such as
    /tmp would otherwise have kms write card data where the link points (a file or a pipe of someone else's)."""
    if mode not in ("w", "wb"):
        raise ValueError(f"open_private writes only ('w' or 'wb'), not {mode!r}")
    private_dir(path.parent)
    flags = (os.O_WRONLY | os.O_CREAT | (os.O_EXCL if exclusive else os.O_TRUNC) | os.O_NOFOLLOW
             | getattr(os, "O_CLOEXEC", 0))
    try:
        fd = os.open(path, flags, PRIVATE_FILE)
    except OSError as error:
        # ELOOP (Linux; EMLINK on FreeBSD) is how O_NOFOLLOW refuses a link; with O_EXCL a link is just "exists"
        if error.errno in (errno.ELOOP, errno.EMLINK) and path.is_symlink():
            raise InvalidArgument(str(path), "is a symbolic link; kms does not write through one (remove it or "
                                             "choose another path)") from None
        raise
    try:
        _restrict(fd)
    except BaseException:
        os.close(fd)
        raise
    with os.fdopen(fd, mode, **kwargs) as f:
        yield f


def write_private(path: Path, data: bytes | str) -> Path:
    """Write ``data`` to ``path`` as a 0600 file, atomically (a temporary file beside it, then a rename): readers see
    the old content or the new, never half of it, and a failure leaves no partial file. Text is UTF-8. Missing
    parents are created 0700. A path that is not a regular file (a device, a pipe) is written in place. A symbolic
    link is never written through: one to a regular file is replaced by the file, any other is refused
    (open_private)."""
    raw = data.encode("utf-8") if isinstance(data, str) else data
    if path.exists() and not path.is_file():
        with open_private(path, "wb") as f:
            f.write(raw)
        return path
    private_dir(path.parent)
    tmp = path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), PRIVATE_FILE)
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), PRIVATE_FILE)
            f.write(raw)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def create_private(path: Path) -> bool:
    """Create ``path`` as an empty 0600 file unless it exists (e.g. a SQLite database before SQLite opens it, so
    that it and its -wal/-shm files, which SQLite gives the database file's mode, are private). Returns True if it
    was created here. The parent directory must exist."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), PRIVATE_FILE)
    except FileExistsError:
        return False
    try:
        os.fchmod(fd, PRIVATE_FILE)
    finally:
        os.close(fd)
    return True


def copy_tree_private(source: Path, target: Path) -> None:
    """Copy the files under ``source`` to ``target``: directories 0700, files 0600 (not the source's modes)."""
    private_dir(target)
    for entry in sorted(source.iterdir()):
        if entry.is_dir():
            copy_tree_private(entry, target / entry.name)
        elif entry.is_file():
            write_private(target / entry.name, entry.read_bytes())


def read_yaml_mapping(path: Path) -> dict[str, Any]:
    """A YAML file whose top level is a mapping; anything else is one ConfigError naming the file."""
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as error:
        raise ConfigError(f"{path}: cannot read ({error.strerror})") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text") from None
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML ({getattr(error, 'problem', error)})") from None
    if not isinstance(doc, dict):
        raise ConfigError(f"{path}: expected a mapping")
    return doc
