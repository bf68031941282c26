"""Canary: drive every kind of state change through a real server (ceremonies with key components, escrow export, a
transport key hand-off, officers, batches, issuance, chip binding, re-issue, the card lifecycle), then read every
audit record in the database: no master or transport key, PIN, component, wrapped key or full card identity (PAN,
card serial, KDD) appears in any of them, nor in any log line; each kind of change left at least one record, and
the chain is intact."""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import logging
import secrets

import pytest
import sqlalchemy as sa
from helpers import (
    MASTER_KEYS,
    TEST_TRANSPORT_KEYS,
    card,
    client,
    key,
    officer,
    officer_params,
    open_batch,
    run_ceremony,
    service_client,
)

from kms import config, runtime, store
from kms.audit.log import AuditLog, chain, mask_pan
from kms.cards.cardid import CardIdentity
from kms.ceremony import components
from kms.client.ceremony import CeremonyClient
from kms.clock import SystemClock
from kms.dev.home import Home
from kms.errors import InvalidArgument, InvalidState
from kms.hsm.types import Algorithm
from kms.identity import Principal
from kms.server.serve import Service
from kms.station import accept_transport_key, new_unwrap_key

ALICE, BOB, CHEN = (officer("hrss", i) for i in range(3))
CAROL, DAVE, FRANK = (officer("bank", i) for i in range(3))

#: Every kind of record a state change writes (kms.issuance.batches, ceremonies, registry, officers, handoffs,
#: lifecycle).
KINDS = {
    "service.started",
    "batch.created", "batch.authorized", "card.chip-bound", "card.reissue-consented", "card.reissued",
    "issuance.issued",
    "ceremony.proposed", "ceremony.approved", "ceremony.component", "ceremony.components-out", "ceremony.cancelled",
    "ceremony.executing", "ceremony.executed", "ceremony.failed",
    "key.added", "key.kcv", "key.state",
    "officer.enrolled", "officer.revoked",
    "handoff.offered", "handoff.confirmed",
    "lifecycle.reported-lost", "lifecycle.loss-report-cancelled", "lifecycle.cancelled", "lifecycle.closed",
    "lifecycle.replace-consented", "lifecycle.replaced", "lifecycle.replaces",
}


def _as(home: Home, service: Service, who: Principal) -> CeremonyClient:
    return CeremonyClient(client(home, service.port, who))


def _part(algorithm: Algorithm) -> bytearray:
    return bytearray(secrets.token_bytes(algorithm.length))


def _name() -> str:
    return f"test-canary-{secrets.token_hex(4)}"  # after the genesis keys by name (tests/test_hsm.py)


def test_no_secret_and_no_full_card_identity_in_any_audit_record(
        home: Home, service: Service, capfd: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    engine = store.make_engine(config.load(home.config).database)
    log = AuditLog(engine, SystemClock())
    start, _ = log.head()
    secret_values: list[bytes] = [*MASTER_KEYS.values(), *TEST_TRANSPORT_KEYS.values()]

    # -- ceremonies: an import from components, one whose joined KCV is wrong (failed), escrow export, a cancel --
    parts = {BOB: _part(Algorithm.DES2), CHEN: _part(Algorithm.DES2)}
    joined = components.join(list(parts.values()))
    imported = run_ceremony(home, service.port, "hrss", "import-master-key",
                            {"name": _name(), "kcv": components.kcv(Algorithm.DES2, joined),
                             "custodians": ["bob", "chen"]}, execute=False)
    for who, part in parts.items():
        _as(home, service, who).submit_component(imported.ceremony_id, part, components.kcv(Algorithm.DES2, part))
    assert _as(home, service, ALICE).execute(imported.ceremony_id).state == "executed"
    wrong = {DAVE: _part(Algorithm.DES2), FRANK: _part(Algorithm.DES2)}
    failing = run_ceremony(home, service.port, "bank", "import-master-key",
                           {"name": _name(), "kcv": "000000", "custodians": ["dave", "frank"]}, execute=False)
    for who, part in wrong.items():
        _as(home, service, who).submit_component(failing.ceremony_id, part, components.kcv(Algorithm.DES2, part))
    with pytest.raises(InvalidState, match="differs from the expected"):
        _as(home, service, CAROL).execute(failing.ceremony_id)
    escrowed = _name()
    run_ceremony(home, service.port, "hrss", "generate-master-key", {"name": escrowed, "escrow": "yes"})
    exported = run_ceremony(home, service.port, "hrss", "export-master-key",
                            {"name": escrowed, "version": 1, "recipients": ["bob", "chen"]})
    opened = [_as(home, service, who).fetch_component(exported.ceremony_id, key(home, who), who.uri())[0]
              for who in (BOB, CHEN)]
    secret_values += [bytes(p) for p in (*parts.values(), joined, *wrong.values(),
                                         components.join(list(wrong.values())), *opened, components.join(opened))]
    cancelled = _as(home, service, ALICE).propose("generate-master-key", {"name": _name()})
    _as(home, service, ALICE).cancel(cancelled.ceremony_id)

    # -- officers: enrolled, then revoked -------------------------------------------------------------------------
    name = f"o{secrets.token_hex(3)}"
    run_ceremony(home, service.port, "bank", "enrol-officer",
                 officer_params(home, Principal("officer", name, domain="bank")))
    run_ceremony(home, service.port, "bank", "revoke-officer", {"name": name})

    # -- a transport key handed to station-b1 (rsa-oaep) ----------------------------------------------------------
    station_b1 = config.load_station(home.station_config("station-b1"))
    with runtime.open_station(station_b1) as session:
        spki = new_unwrap_key(session, "station-b1", "hrss").pem
    run_ceremony(home, service.port, "hrss", "register-transport-key",
                 {"bureau": "bureau-b", "station": "station-b1", "method": "rsa-oaep", "public_key": spki})
    with service_client(home, service, "station-b1") as b1:
        handoff = CeremonyClient(b1).fetch_transport_key("hrss")
        secret_values.append(bytes(handoff.wrapped_key))
        with runtime.open_station(station_b1) as session:
            kcv = accept_transport_key(session, "station-b1", "hrss", handoff.label, handoff.wrapped_key, handoff.kcv,
                                       unwrap_key_sha256=handoff.unwrap_key_sha256)
        CeremonyClient(b1).confirm_transport_key("hrss", handoff.version, kcv)

    # -- batches: streamed, a chip bound at the station, a re-issue ------------------------------------------------
    batch, chips = f"B-{secrets.token_hex(4)}", f"B-{secrets.token_hex(4)}"
    cards = [card(500_000 + i, card_ref=f"cn-{i}") for i in range(6)]
    blank = CardIdentity(card_ref="cn-chip-0", city_code="320200", pan="6214830000500107", psn="01")
    chip_serials, chip_kdds = ["86843202AD9F0001", "86843202AD9F0002"], ["0A0B0C0D0E0F10111213", "0A0B0C0D0E0F10111214"]
    with client(home, service.port, ALICE) as alice:
        open_batch(home, service.port, alice, batch, "bureau-a", "dual-app-v1", cards)
        open_batch(home, service.port, alice, chips, "bureau-a", "dual-app-v1", [blank])
    with service_client(home, service, "station-a1") as st:
        assert len(list(st.stream_batch(batch, per_message=4))) == len(cards)
        st.issue_card(chips, blank.card_ref, card_serial=chip_serials[0], kdd=chip_kdds[0])
        with client(home, service.port, ALICE) as alice, client(home, service.port, CAROL) as carol:
            alice.reissue(chips, blank.card_ref)
            carol.reissue(chips, blank.card_ref)
        st.issue_card(chips, blank.card_ref, card_serial=chip_serials[1], kdd=chip_kdds[1])

    # -- the card lifecycle: lost and found, cancelled (hrss) then closed (bank), replaced ----------------------------
    with client(home, service.port, ALICE) as alice, client(home, service.port, CAROL) as carol:
        alice.report_lost("cn-0", "hrss", "reported at the counter")
        alice.cancel_loss_report("cn-0", "hrss", "card found")
        alice.cancel_application("cn-1", "hrss", "cancel-card", "holder deceased")
        carol.cancel_application("cn-1", "bank", "close-account", "account closed on HRSS clearance")
        alice.replace_card("cn-2", "cn-5", "card damaged")
        carol.replace_card("cn-2", "cn-5", "card damaged")
        # Refusals whose messages name card data (a retired PAN, serial, KDD): recorded, but masked.
        retired = next(c for c in cards if c.card_ref == "cn-2")
        with pytest.raises(InvalidArgument, match="retired"):
            alice.create_batch(f"R-{secrets.token_hex(3)}", "bureau-a", "dual-app-v1",
                               [dataclasses.replace(retired, card_ref=f"cn-again-{secrets.token_hex(2)}")])

    # -- every audit record, as stored ------------------------------------------------------------------------------
    with engine.connect() as conn:
        rows = [tuple(row) for row in conn.execute(sa.select(store.audit_log).order_by(store.audit_log.c.seq))]
    text = "\n".join(repr(row) for row in rows)
    raw = text.encode("utf-8")
    pins = [p.read_text().strip() for p in (home.path / "pins").iterdir()]
    assert pins and len(secret_values) > 10
    for value in secret_values:
        assert value.hex() not in text.lower(), "a key or component (hex) is in the audit log"
        assert value not in raw, "a key or component (raw) is in the audit log"
        assert base64.b64encode(value).decode() not in text, "a key or component (base64) is in the audit log"
    for pin in pins:
        assert pin not in text, "a PIN is in the audit log"
    assert "BEGIN PUBLIC KEY" not in text  # public keys (the genesis' officers included) appear as fingerprints
    identities = [*cards, blank]
    for c in identities:
        assert c.pan is not None and c.pan not in text, f"the PAN of {c.card_ref} is in the audit log"
        for value in (c.card_serial, c.kdd):
            assert value is None or value.upper() not in text.upper(), f"an identity of {c.card_ref} is in the log"
    for value in (*chip_serials, *chip_kdds):
        assert value.upper() not in text.upper(), "a card serial or KDD bound from a chip is in the audit log"

    # The same values in no log line either (the server, its workers, this process).
    out, err = capfd.readouterr()
    logged = out + err + caplog.text
    for value in secret_values:
        assert value.hex() not in logged.lower()
    for pin in pins:
        assert pin not in logged

    # -- each kind of change was recorded, masked where it names a card, and the chain is intact -------------------
    bodies = [json.loads(row.body) for row in log.records()]
    new = [b for b in bodies if b["seq"] > start]
    kinds = {b["kind"] for b in new} | {b["kind"] for b in bodies if b["kind"] == "service.started"}
    assert kinds >= KINDS, f"no record of {sorted(KINDS - kinds)}"
    issued = {b["subject"]: b["detail"] for b in new if b["kind"] == "issuance.issued"}
    for c in cards:
        assert issued[f"{batch}/{c.card_ref}"]["pan"] == mask_pan(c.pan)
    assert [b["detail"] for b in new if b["kind"] == "card.chip-bound" and b["subject"] == f"{chips}/cn-chip-0"] == \
        [{"fields": ["card_serial", "kdd"]}] * 2
    [component] = [b for b in new if b["kind"] == "ceremony.component" and b["actor"] == BOB.uri()
                   and b["subject"] == imported.ceremony_id]
    assert component["detail"] == {"custodian": BOB.uri(), "kcv": components.kcv(Algorithm.DES2, parts[BOB])}
    started = [b for b in bodies if b["kind"] == "service.started"][-1]["detail"]
    assert started["config_sha256"] == hashlib.sha256(home.config.read_bytes()).hexdigest()
    assert set(started["policies"]) == {"authz", "quorum", "limits", "profiles"} and started["policies"]["profiles"]
    prev = bytes(32)
    for record in log.records():
        assert record.prev == prev.hex()
        prev = chain(prev, record.body.encode())
        assert record.hash == prev.hex()
