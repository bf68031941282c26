"""Review s21 (items 3 and 4 of the brief): ``kms station unwrap-key --discard`` and the only active signing key."""

from __future__ import annotations

import contextlib
import datetime as dt
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from kms import store
from kms.ceremony import operations
from kms.clock import FixedClock
from kms.errors import NotFound
from kms.hsm.labels import unwrap_key_label
from kms.hsm.session import TokenSession
from kms.registry import KeyKind, KeyRecord, KeyRegistry, KeyState
from kms.station import discard_unwrap_key, new_unwrap_key, spki_sha256, unused_unwrap_keys


def test_discard_destroys_only_an_unused_single_use_key_not_the_legacy_pair(station_session: TokenSession) -> None:
    """--discard takes a key --list shows (single-use, unused): the long-lived pair of a station made before
    single-use keys is not one (--list leaves it out), and a hand-off made to it may still be waiting; its SHA-256
    must not destroy it (before the fix: discard_unwrap_key looked it up with unwrap_key_for, which includes it)."""
    station = station_session
    legacy = unwrap_key_label("station-a1", "bank")
    spki = station.generate_unwrap_keypair(legacy)
    try:
        assert legacy not in [k.label for k in unused_unwrap_keys(station, "station-a1", "bank")]
        with pytest.raises(NotFound):
            discard_unwrap_key(station, "station-a1", "bank", spki_sha256(spki))
        assert station.has_public_key(legacy)
        # another domain's key is not found either, nor is a station's own key under another station name
        made = new_unwrap_key(station, "station-a1", "hrss")
        with pytest.raises(NotFound):
            discard_unwrap_key(station, "station-a1", "bank", made.sha256)
        with pytest.raises(NotFound):
            discard_unwrap_key(station, "station-a2", "hrss", made.sha256)
        assert discard_unwrap_key(station, "station-a1", "hrss", made.sha256.upper()) == made.label
    finally:
        station.retire_unwrap_pair(legacy)


@pytest.fixture
def key_registry(tmp_path: Path) -> KeyRegistry:
    engine = store.make_engine(f"sqlite:///{tmp_path / 'kms.db'}")
    store.upgrade(engine)
    return KeyRegistry(engine, FixedClock(dt.datetime(2026, 12, 2, 9, 0, 0, tzinfo=dt.UTC)))


def _signing(registry: KeyRegistry) -> tuple[KeyRecord, KeyRecord]:
    one = registry.add("bank", KeyKind.SIGNING, "issuance", "ecdsa-p256", public_key=b"one", state=KeyState.ACTIVE)
    two = registry.add("bank", KeyKind.SIGNING, "issuance", "ecdsa-p256", public_key=b"two", state=KeyState.ACTIVE)
    return one, two


def _ceremony(version: int) -> Any:
    return SimpleNamespace(domain="bank", params={"kind": "signing", "name": "issuance", "version": version,
                                                  "state": "deactivated"})


def test_two_concurrent_retirements_leave_a_signing_key_active(key_registry: KeyRegistry) -> None:
    """Two versions active; the two ceremonies deactivating them execute at the same time. The interleaving is forced
    here: the second ceremony runs completely between the first one's check and its transition (s21 review F4: both
    deactivated, before the check was made again in the transition's transaction, KeyRegistry.transition's
    keep_one_active)."""
    one, two = _signing(key_registry)

    class Interleaving(KeyRegistry):
        nested = False

        def transition(self, record: KeyRecord, to: KeyState) -> KeyRecord:
            if not Interleaving.nested and record.version == one.version:
                Interleaving.nested = True
                other: Any = SimpleNamespace(registry=key_registry)
                operations._run_state(other, _ceremony(two.version))
            return super().transition(record, to)

    racing = Interleaving(key_registry._engine, key_registry._clock)
    with contextlib.suppress(Exception):  # a fix may refuse the first one instead
        context: Any = SimpleNamespace(registry=racing)
        operations._run_state(context, _ceremony(one.version))
    active = [r.version for r in key_registry.versions("bank", KeyKind.SIGNING, "issuance")
              if r.state is KeyState.ACTIVE]
    assert active != []
