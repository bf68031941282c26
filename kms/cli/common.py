"""What the command groups share: printing a result (text or ``--json``), a client from a configuration file, the
card CSV format, and a progress line."""

from __future__ import annotations

import argparse
import csv
import json
import secrets
import sys
import time
from pathlib import Path
from typing import Any

from kms import config as config_mod
from kms import errors
from kms.files import open_private

#: The card CSV columns (`kms batch create --cards`, `kms bundle seal --cards`, `kms dev cards`).
CARD_COLUMNS = ("card_ref", "city_code", "card_serial", "pan", "psn", "kdd")


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


def write_random_cards(path: Path, count: int, city_code: str = "320200") -> None:
    """``count`` random dual-application card identities as a card CSV (mode 0600: it holds PANs)."""
    with open_private(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(CARD_COLUMNS)
        for i in range(count):
            writer.writerow([
                f"card-{i:07d}", city_code, secrets.token_hex(8).upper(),
                "621483" + f"{secrets.randbelow(10**13):013d}", f"{secrets.randbelow(100):02d}",
                secrets.token_hex(10).upper(),
            ])


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


class Progress:
    """One line on stderr, only when enabled (a terminal, no ``--json``): a bar, ``count/total`` and the caller's
    note, redrawn at most five times a second. ``total`` may be set later (0: not known yet)."""

    def __init__(self, total: int = 0, *, enabled: bool) -> None:
        self.total, self.enabled = total, enabled
        self._last = 0.0

    def update(self, count: int, note: str = "", *, final: bool = False) -> None:
        now = time.monotonic()
        if not self.enabled or (not final and now - self._last < 0.2):
            return
        self._last = now
        percent = min(count * 100 // self.total, 100) if self.total else 100
        bar = "#" * (percent // 4)
        print(f"\r[{bar:<25}] {note}{', ' if note else ''}{count}/{self.total}", end="", file=sys.stderr,
              flush=True)

    def done(self) -> None:
        if self.enabled:
            print(file=sys.stderr)
