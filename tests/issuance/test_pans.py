"""Cardholder data at rest (kms.issuance.pans): PANs are stored only sealed to the bank domain's data key, looked up by
keyed indexes made in the bank token, and opened only in the bank domain's workers to derive the card's keys."""

from __future__ import annotations

import dataclasses
import hashlib
import re
import secrets
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
import sqlalchemy as sa
from helpers import MASTER_KEYS, TEST_RANGE_PROFILE, VECTORS, authorize_batch, card, service_client

from kms import bundle, config, runtime, store
from kms.cards import reference
from kms.cards.cardid import CardIdentity
from kms.clock import SystemClock
from kms.dev.ceremonies import officer
from kms.dev.home import Home
from kms.errors import ConfigError, InvalidArgument, InvalidState
from kms.hsm.session import TokenSession
from kms.issuance import pans
from kms.registry import KeyKind, KeyRegistry
from kms.server.serve import Service


@dataclass
class _BankWorker:
    """What kms.issuance.workers gives a worker-side function: its domain, token session and registry."""

    domain: str
    session: TokenSession
    registry: KeyRegistry


@pytest.fixture(scope="module")
def bank(sessions: dict[str, TokenSession], registry: KeyRegistry) -> _BankWorker:
    return _BankWorker("bank", sessions["bank"], registry)


def test_the_bank_token_holds_the_pan_keys_and_they_never_leave_it(bank: _BankWorker) -> None:
    data = bank.registry.active("bank", KeyKind.DATA, pans.DATA_KEY)
    index = bank.registry.active("bank", KeyKind.DATA, pans.INDEX_KEY)
    objects = {o.label: o for o in bank.session.objects()}
    for record in (data, index):
        info = objects[record.label]
        assert info.sensitive and not info.extractable, record.label
    assert not bank.registry.names("hrss", KeyKind.DATA)  # the PAN is the bank application's data


def test_a_pan_is_sealed_bound_to_its_card_and_opens_only_in_the_bank_worker(bank: _BankWorker) -> None:
    pan, psn = "6214839912345678901", "01"
    (sealed, index, pan_psn_index), = pans.protect_pans(bank, "B-pan", [("pan-card-1", pan, psn)])
    assert pan.encode() not in sealed and sealed[0] == pans.FORMAT
    protected = pans.ProtectedPan(sealed=sealed, index=index, pan_psn_index=pan_psn_index, masked="621483*********8901")
    opened = pans.open_card(bank, CardIdentity(card_ref="pan-card-1", psn=psn, protected=protected), "B-pan", {})
    assert opened.pan == pan
    # indexes are keyed: the same PAN gives the same index, but nobody without the token can compute it
    again, = pans.protect_pans(bank, "B-pan", [("pan-card-2", pan, "02")])
    assert again[1] == index and again[2] != pan_psn_index and again[0] != sealed
    assert index not in (hashlib.sha256(pan.encode()).hexdigest(),
                         hashlib.sha256(f"{pan}/{psn}".encode()).hexdigest())
    # moved to another card, altered, or unknown format: refused naming the field, never a wrong PAN
    for moved in (CardIdentity(card_ref="pan-card-9", psn=psn, protected=protected),  # another card
                  CardIdentity(card_ref="pan-card-1", psn="02", protected=protected)):  # its PSN changed
        with pytest.raises(InvalidArgument, match=r"^pan: cannot be decrypted"):
            pans.open_card(bank, moved, "B-pan", {})
    with pytest.raises(InvalidArgument, match=r"^pan: cannot be decrypted"):  # another batch
        pans.open_card(bank, CardIdentity(card_ref="pan-card-1", psn=psn, protected=protected), "B-other", {})
    altered = dataclasses.replace(protected, sealed=sealed[:-1] + bytes([sealed[-1] ^ 1]))
    with pytest.raises(InvalidArgument, match=r"^pan: cannot be decrypted"):
        pans.open_card(bank, CardIdentity(card_ref="pan-card-1", psn=psn, protected=altered), "B-pan", {})
    with pytest.raises(InvalidArgument, match="not in a known format"):
        pans.open_card(bank, CardIdentity(card_ref="pan-card-1", psn=psn,
                                          protected=dataclasses.replace(protected, sealed=b"\x07" + sealed[1:])),
                       "B-pan", {})


def test_the_coordinator_sends_pans_a_chunk_at_a_time_and_always_with_a_batch_id(bank: _BankWorker) -> None:
    """PanVault stays inside the bank worker service's cap per call (kms.server.worker._protect) and names a batch id
    even for a look-up; each chunk is protected in the real bank token."""
    calls: list[tuple[str, int]] = []

    def call(function: object, batch_id: str, items: list[tuple[str, str, str]]) -> object:
        calls.append((batch_id, len(items)))
        return pans.protect_pans(bank, batch_id, items)

    cards = [card(i, card_ref=f"chunk-{i:05d}") for i in range(pans.MAX_PANS_PER_CALL + 3)]
    protected = pans.PanVault(call).protect(cards, "B-chunks")
    assert calls == [("B-chunks", pans.MAX_PANS_PER_CALL), ("B-chunks", 3)]
    assert all(c.pan is None and c.protected is not None for c in protected)
    calls.clear()
    pans.PanVault(call).protect(cards[:2])
    assert calls == [(pans.LOOKUP_BATCH, 2)]


def test_only_the_bank_domain_protects_pans(sessions: dict[str, TokenSession], registry: KeyRegistry) -> None:
    with pytest.raises(InvalidState, match="protected by the bank domain"):
        pans.protect_pans(_BankWorker("hrss", sessions["hrss"], registry), "B", [("c", "6214830000000000001", "01")])


def test_the_hrss_token_cannot_open_a_pan(bank: _BankWorker, sessions: dict[str, TokenSession]) -> None:
    pans.protect_pans(bank, "B-pan", [("pan-card-h", "6214839900000000001", "01")])
    label = bank.registry.active("bank", KeyKind.DATA, pans.DATA_KEY).label
    assert not sessions["hrss"].has_key(label)


_PAN_DIGITS = re.compile(rb"(?<![0-9])(?:62148|12345678)[0-9]{7,14}(?![0-9])")


def _database_bytes(cfg: config.Config) -> dict[str, bytes]:
    """The raw bytes of the database and its -wal/-shm files, read by a child process. Never open() them here: this
    process holds SQLite connections to the same files (the session's registry, the in-process service), and closing
    any descriptor of a file drops every POSIX lock the process holds on it (sqlite.org/howtocorrupt.html, 2.2).
    Another process may then reset the WAL under those connections, which later read garbage ("file is not a
    database")."""
    path = Path(sa.make_url(cfg.database).database or "")
    if not path.is_absolute():
        path = cfg.home / path
    return {p.name: subprocess.run(["cat", str(p)], check=True, capture_output=True).stdout
            for p in path.parent.glob(path.name + "*")}


def test_no_pan_is_readable_in_the_issuer_database(home: Home, service: Service) -> None:
    """The finding: kms.db held every card's PAN in clear. After a batch is created, authorized, streamed,
    re-issued and a card replaced, no table (WAL included) holds any test PAN; and the bank's keys are derived
    from the real PAN (the public Option A vector)."""
    tag = secrets.token_hex(3)
    vector = VECTORS["option_a"][0]
    cards = [card(950_000 + i, card_ref=f"pan-{tag}-{i}") for i in range(3)]
    cards[0] = dataclasses.replace(cards[0], pan=vector["pan"], psn=vector["psn"])
    batch_id = f"PAN-{tag}"
    with service_client(home, service, officer("hrss", 0)) as alice, \
            service_client(home, service, officer("bank", 0)) as carol, \
            service_client(home, service, "station-a1") as st:
        alice.create_batch(batch_id, "bureau-a", TEST_RANGE_PROFILE, cards)
        authorize_batch(home, service.port, batch_id)
        received = {b.card_ref: b.data for b in st.stream_batch(batch_id)}
        assert set(received) == {c.card_ref for c in cards}
        alice.reissue(batch_id, cards[1].card_ref)
        carol.reissue(batch_id, cards[1].card_ref)
        alice.replace_card(cards[2].card_ref, cards[1].card_ref, "damaged")
    # the bank section's UDK-AC comes from the real PAN, opened in the bank worker only
    bank_section = next(s for s in bundle.parse(received[cards[0].card_ref]).sections if s.domain == "bank")
    udk_ac = next(k for k in bank_section.keys if k.name == "udk-ac")
    assert MASTER_KEYS[("bank", "bank-imk-ac")] == bytes.fromhex(vector["imk"])
    assert reference.odd_parity(reference.option_a(bytes.fromhex(vector["imk"]), vector["pan"], vector["psn"])) \
        == bytes.fromhex(vector["key"])
    assert udk_ac.kcv.hex().upper() == vector["kcv"]
    cfg = config.load(home.config)
    files = _database_bytes(cfg)
    assert "kms.db" in files
    for name, data in files.items():
        for c in cards:
            assert c.pan is not None and c.pan.encode() not in data, f"PAN of {c.card_ref} in {name}"
        leaks = _PAN_DIGITS.findall(data)
        assert not leaks, f"{name} holds {len(leaks)} clear test PANs, e.g. {leaks[0][:6]!r}..."
    # what the records hold instead: masked, sealed, indexed
    engine = store.make_engine(cfg.database)
    with engine.connect() as conn:
        row = conn.execute(sa.select(store.batch_cards).where(
            store.batch_cards.c.card_ref == cards[0].card_ref)).one()
    assert row.pan_masked == vector["pan"][:6] + "*" * (len(vector["pan"]) - 10) + vector["pan"][-4:]
    assert len(row.pan_index) == 64 and row.pan_sealed[0] == pans.FORMAT


def test_registry_fixture_sees_the_bank_keys(cfg: config.Config) -> None:
    registry = runtime.registry(cfg, SystemClock())
    assert registry.active("bank", KeyKind.DATA, pans.DATA_KEY).kcv


def test_a_database_made_by_an_older_kms_is_refused_clearly(tmp_path: Path) -> None:
    """Homes made before PANs were protected (clear ``batch_cards.pan``) are refused, not half upgraded."""
    engine = store.make_engine(f"sqlite:///{tmp_path / 'old.db'}")
    with engine.begin() as conn:
        conn.execute(sa.text("CREATE TABLE batch_cards (batch_id VARCHAR(64), card_ref VARCHAR(64), pan VARCHAR(19))"))
    with pytest.raises(ConfigError, match=r"made by an older kms and its schema is not the one schema migrations "
                                          r"start from \(lacks batch_cards\.sequence, lacks batch_cards\.city_code"):
        store.upgrade(engine)
    assert store.schema_status(engine).state == "unversioned"  # refused as a whole: nothing added
    with engine.connect() as conn:
        assert sa.inspect(conn).get_table_names() == ["batch_cards"]


def test_no_worker_call_hands_a_clear_pan_to_the_coordinator(service: Service) -> None:
    """The review: any importable function could be run in a worker, e.g. pans.open_card. Workers run only their
    listed steps; opening a PAN is not one of them (it happens inside sealing)."""
    import importlib

    from kms.issuance.workers import WORKER_STEPS

    for name in WORKER_STEPS:  # every listed step exists (no typo lets a step silently fail)
        module, _, function = name.rpartition(".")
        assert callable(getattr(importlib.import_module(module), function)), name
    bank_pool = service.pools.pools["bank"]
    with pytest.raises(InvalidState, match=r"kms\.issuance\.pans\.open_card is not a step"):
        bank_pool.call(pans.open_card, CardIdentity(card_ref="x"), "B", {})
    with pytest.raises(InvalidState, match="is not a step"):
        bank_pool.call(runtime.open_domain)
