"""What the command groups share: how a command is declared (description, example, the options every command spells
the same way, their environment variables), printing a result (text or ``--json``), a client from a configuration
file, refusing to overwrite a file, the card CSV format, and progress on stderr."""

from __future__ import annotations

import argparse
import csv
import json
import os
import secrets
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

from kms import config as config_mod
from kms import errors
from kms.files import open_private

#: The card CSV columns (`kms batch create --cards`, `kms bundle seal --cards`, `kms dev cards`).
CARD_COLUMNS = ("card_ref", "city_code", "card_serial", "pan", "psn", "kdd")


#: The environment variables that give a flag its default; the flag wins (each flag's help says so).
ENV = {"--server": "KMS_SERVER", "--client": "KMS_CLIENT", "--station-config": "KMS_STATION_CONFIG",
       "--config": "KMS_CONFIG"}


def command(sub: Any, name: str, text: str, description: str, example: str) -> argparse.ArgumentParser:
    """A command (or command group) with its one-line ``text`` for the list, a ``description`` (paragraphs apart by
    blank lines) and an ``example`` (shell lines) for its ``--help``."""
    paragraphs = [textwrap.fill(" ".join(p.split()), 100) for p in description.strip().split("\n\n")]
    parser: argparse.ArgumentParser = sub.add_parser(
        name, help=text, description="\n\n".join(paragraphs),
        epilog="example:\n" + "\n".join(f"  {line}" for line in example.strip().splitlines()),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    return parser


def commands(parser: argparse.ArgumentParser, dest: str) -> Any:
    """The sub-commands of a command group."""
    return parser.add_subparsers(dest=dest, required=True, metavar="COMMAND")


def env_path(parser: argparse.ArgumentParser, flag: str, text: str, *, required: bool = True) -> None:
    """A file option whose default comes from its environment variable (ENV); required unless that is set."""
    env = ENV[flag]
    value = os.environ.get(env) or None
    parser.add_argument(flag, type=Path, default=Path(value) if value else None, required=required and not value,
                        metavar="FILE", help=f"{text} (default: ${env})")


def server_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--server", type=_servers, default=os.environ.get(ENV["--server"]) or None,
                        metavar="HOST:PORT[,HOST:PORT...]",
                        help="the service's address, or several replicas' separated by commas (calls are balanced "
                             "over them and fail over between them), instead of the configuration's client.server "
                             f"(default: ${ENV['--server']})")


def _servers(text: str) -> str:
    """--server's value (or $KMS_SERVER's) checked, as kms.config.endpoints reads it: one line naming what is
    wrong (argparse prints it, exit 2)."""
    try:
        return ",".join(str(e) for e in config_mod.endpoints(text))
    except ValueError as error:
        source = f" (from ${ENV['--server']})" if text == os.environ.get(ENV["--server"]) else ""
        raise argparse.ArgumentTypeError(f"{error}{source}") from None


def json_option(parser: argparse.ArgumentParser, what: str = "the result") -> None:
    parser.add_argument("--json", action="store_true", help=f"print {what} as JSON on stdout")


def client_options(parser: argparse.ArgumentParser, who: str, *, json: bool = True) -> None:
    """--client (``who``'s client configuration), --server and --json."""
    env_path(parser, "--client", who)
    server_option(parser)
    if json:
        json_option(parser)


def force_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--force", action="store_true", help="overwrite the output file if it exists")


def refuse_existing(path: Path, force: bool) -> None:
    """No silent overwrite: AlreadyExists naming ``path`` if it exists, unless ``--force``; a symbolic link there,
    dangling or not, is refused as such (InvalidArgument, the words of kms.files.open_private) unless ``--force``.
    (With --force the writer never writes through a link either: kms.files replaces a link to a regular file by the
    file, and refuses any other.)"""
    if force:
        return
    if path.is_symlink():
        raise errors.InvalidArgument(str(path), "is a symbolic link; kms does not write through one (remove it or "
                                                "choose another path)")
    if path.exists():
        raise errors.AlreadyExists(f"{path} exists; choose another file, or pass --force to overwrite it")


def emit(args: argparse.Namespace, doc: Any, text: str) -> None:
    """The result of a command: ``doc`` as JSON with ``--json``, else ``text``."""
    print(json.dumps(doc, indent=2, sort_keys=True) if getattr(args, "json", False) else text)


def client_for(path: Path, server: str | None) -> Any:
    """A service client from a client configuration, or from a station configuration's ``client`` section."""
    from kms.client.service import Client

    doc = config_mod.load_station(path).client if _is_station_config(path) else config_mod.load_client(path)
    if doc is None:
        raise errors.ConfigError(f"{path}: no 'client' section")
    return Client(doc, server=server)


def _is_station_config(path: Path) -> bool:
    import yaml

    try:
        return "station" in (yaml.safe_load(path.read_text(encoding="utf-8")) or {})
    except (OSError, yaml.YAMLError, UnicodeDecodeError):
        return False


def write_random_cards(path: Path, count: int, city_code: str = "320200", prefix: str = "card-") -> None:
    """``count`` random dual-application card identities as a card CSV (mode 0600: it holds PANs)."""
    with open_private(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(CARD_COLUMNS)
        for i in range(count):
            writer.writerow([
                f"{prefix}{i:07d}", city_code, secrets.token_hex(8).upper(),
                _random_pan(), f"{secrets.randbelow(100):02d}",
                secrets.token_hex(10).upper(),
            ])


def _random_pan() -> str:
    """A random 19-digit PAN of the development BIN 621483 that passes the Luhn check, as profiles require."""
    from kms.cards.cardid import with_luhn_digit

    return with_luhn_digit("621483" + f"{secrets.randbelow(10**12):012d}")


def read_cards(path: Path) -> list[Any]:
    """The card identities of a card CSV, each checked field by field; an error names the file, line and field."""
    from kms.cards.cardid import CardIdentity

    cards = []
    seen: dict[str, int] = {}
    try:
        with path.open(newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            for line, row in enumerate(reader, start=2):
                try:
                    card = CardIdentity.from_mapping({k: v for k, v in row.items() if v not in (None, "")})
                except errors.InvalidArgument as error:
                    raise errors.InvalidArgument(f"{path}:{line}: {error.field}", error.reason) from None
                if card.card_ref in seen:
                    raise errors.InvalidArgument(f"{path}:{line}: card_ref",
                                                 f"{card.card_ref} already appears on line {seen[card.card_ref]}")
                seen[card.card_ref] = line
                cards.append(card)
    except OSError as error:
        raise errors.ConfigError(f"{path}: cannot read ({error.strerror})") from None
    except UnicodeDecodeError:
        raise errors.InvalidArgument(str(path), "not UTF-8 text") from None
    return cards


def _duration(seconds: float) -> str:
    seconds = int(seconds + 0.5)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}" if seconds >= 3600 \
        else f"{seconds // 60}:{seconds % 60:02d}"


class Progress:
    """Progress on stderr (never stdout, so ``--json > file`` stays valid JSON): on a terminal, one line redrawn at
    most five times a second with a bar, ``count/total``, the rate and the time left; otherwise (a log file, a
    pipe) a plain line per 10 % done. ``total`` may be set later (0: not known yet); ``unit`` names what is
    counted."""

    def __init__(self, total: int = 0, *, enabled: bool = True, unit: str = "items") -> None:
        self.total, self.enabled, self.unit = total, enabled, unit
        self._tty = sys.stderr.isatty()
        self._started = time.monotonic()
        self._last = 0.0
        self._tenths = 0  # the 10 % steps already printed (not on a terminal)
        self._drawn = False

    def _figures(self, count: int) -> tuple[int, str]:
        elapsed = time.monotonic() - self._started
        rate = count / elapsed if elapsed > 0 else 0.0
        percent = min(count * 100 // self.total, 100) if self.total else 100
        text = f"{count}/{self.total} {self.unit}" if self.total else f"{count} {self.unit}"
        text += f", {rate:,.0f}/s" if rate else ""
        if self.total and rate and count < self.total:
            text += f", ETA {_duration((self.total - count) / rate)}"
        elif count and (not self.total or count >= self.total):
            text += f", {_duration(elapsed)}"
        return percent, text

    def update(self, count: int, note: str = "", *, final: bool = False) -> None:
        if not self.enabled:
            return
        if self._tty:
            now = time.monotonic()
            if not final and now - self._last < 0.2:
                return
            self._last = now
            percent, text = self._figures(count)
            print(f"\r[{'#' * (percent // 4):<25}] {note}{', ' if note else ''}{text}\033[K", end="",
                  file=sys.stderr, flush=True)
            self._drawn = True
            return
        if not self.total:
            return
        tenths = min(count * 10 // self.total, 10)
        if tenths > self._tenths:
            self._tenths = tenths
            percent, text = self._figures(count)
            print(f"kms: {percent} % ({note}{', ' if note else ''}{text})", file=sys.stderr, flush=True)

    def done(self) -> None:
        if self.enabled and self._tty and self._drawn:
            print(file=sys.stderr)
            self._drawn = False
