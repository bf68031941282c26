"""Shared fixtures: one development home on real SoftHSM2 tokens for the whole session.

Master keys are imported from known values (so tests can compute the expected card keys in software), and a test
bureau gets a transport key whose value the tests know (so they can unwrap sealed keys in software). Everything
else — signing keys, the stations' transport keys — is generated inside the tokens as in production.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from kms import config, runtime, store
from kms.cards import profiles
from kms.cards.cardid import CardIdentity
from kms.client.service import Client
from kms.clock import SystemClock
from kms.dev.home import Home, init_home
from kms.hsm.session import TokenSession
from kms.hsm.types import Algorithm, KcvMethod
from kms.identity import Principal
from kms.issuance.sealer import DomainSealer, new_serial
from kms.registry import DOMAINS, KeyKind, KeyRegistry
from kms.server.serve import Service
from kms.station import Station, TrustStore

ROOT = Path(__file__).resolve().parent.parent
VECTORS_PATH = Path(__file__).resolve().parent / "vectors" / "derivation.json"
VECTORS = json.loads(VECTORS_PATH.read_text())
PROFILE = profiles.load(ROOT / "kms" / "policies" / "profiles" / "dual-app.yaml")
TEST_BUREAU = "bureau-test"


def _known_master_keys() -> dict[tuple[str, str], bytes]:
    keys = {(d, name): secrets.token_bytes(16) for d in DOMAINS for name in PROFILE.master_keys(d)}
    # The public vectors' keys where they fit, so a card from the vectors comes out as the vectors say.
    keys[("bank", "bank-imk-ac")] = bytes.fromhex(VECTORS["option_a"][0]["imk"])
    keys[("hrss", "hrss-mk")] = bytes.fromhex(VECTORS["ssc_chain"][0]["root"])
    keys[("bank", "bank-kmc")] = bytes.fromhex(VECTORS["gp_kmc"][0]["kmc"])
    return keys


MASTER_KEYS = _known_master_keys()
TEST_TRANSPORT_KEYS = {d: secrets.token_bytes(32) for d in DOMAINS}


@pytest.fixture(scope="session")
def home(tmp_path_factory: pytest.TempPathFactory) -> Home:
    path = tmp_path_factory.mktemp("kms-home")
    h = init_home(
        path,
        bureaus={"bureau-a": ("station-a1",), "bureau-b": ("station-b1",)},
        master_keys=MASTER_KEYS,
    )
    return h


@pytest.fixture(scope="session")
def cfg(home: Home) -> config.Config:
    return config.load(home.config)


@pytest.fixture(scope="session")
def registry(cfg: config.Config) -> KeyRegistry:
    return runtime.registry(cfg, SystemClock())


@pytest.fixture(scope="session")
def sessions(cfg: config.Config) -> Iterator[dict[str, TokenSession]]:
    """One session per domain token. (In production each lives in its own domain's worker process; a test
    process may hold both.)"""
    opened = {d: runtime.open_domain(cfg, d) for d in DOMAINS}
    yield opened
    for s in opened.values():
        s.close()


@pytest.fixture(scope="session")
def test_bureau(sessions: dict[str, TokenSession], registry: KeyRegistry) -> str:
    """A bureau whose transport keys the tests know, imported into each domain's token."""
    for domain, value in TEST_TRANSPORT_KEYS.items():
        record = registry.add(domain, KeyKind.TRANSPORT, TEST_BUREAU, Algorithm.AES256.value)
        kcv = sessions[domain].import_transport_key(record.label, bytearray(value))
        registry.set_kcv(record, kcv.hex().upper(), KcvMethod.AES_ECB_ZERO.value)
    return TEST_BUREAU


@pytest.fixture(scope="session")
def sealers(
    sessions: dict[str, TokenSession], registry: KeyRegistry
) -> dict[str, DomainSealer]:
    return {d: DomainSealer(d, sessions[d], registry, PROFILE, "bureau-a", SystemClock()) for d in DOMAINS}


@pytest.fixture(scope="session")
def station_config(home: Home) -> config.StationConfig:
    return config.load_station(home.station_config("station-a1"))


@pytest.fixture(scope="session")
def station_session(station_config: config.StationConfig) -> Iterator[TokenSession]:
    s = runtime.open_station(station_config)
    yield s
    s.close()


@pytest.fixture
def station(station_config: config.StationConfig, station_session: TokenSession, tmp_path: Path) -> Station:
    """The bureau-a station with a fresh opened-bundle ledger."""
    ledger = store.make_engine(f"sqlite:///{tmp_path / 'ledger.db'}")
    store.create_station_ledger(ledger)
    return Station(station_config.name, station_config.bureau, station_config.domains, station_session,
                   TrustStore.load(station_config.trust), ledger, SystemClock())


def card(i: int = 0, **overrides: str) -> CardIdentity:
    fields = {
        "card_ref": f"card-{i:06d}", "city_code": "320200", "card_serial": f"{0x86843202AD932A48 + i:016X}",
        "pan": f"{6214830000000000000 + i}", "psn": "01", "kdd": f"{0x00010203040506070809 + i:020X}",
    }
    fields.update(overrides)
    return CardIdentity(**fields)


def seal(sealers: dict[str, DomainSealer], c: CardIdentity, batch: str = "B-1") -> bytes:
    from kms import bundle

    serial = new_serial()
    sections = {d: bundle.encode_section(s.seal(c, serial=serial, batch=batch)) for d, s in sealers.items()}
    return bundle.assemble(serial, c.card_ref, sections)


# -- store backends ----------------------------------------------------------------------------------------------

POSTGRES = os.environ.get("KMS_TEST_POSTGRES_URL")
EngineFactory = Callable[[], sa.Engine]


@pytest.fixture(params=["sqlite", "postgresql"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[EngineFactory]:
    """Makes engines on one fresh database (so that tests can race several engines against it)."""
    made: list[sa.Engine] = []
    admin: sa.Engine | None = None
    schema = f"t_{uuid.uuid4().hex[:12]}"
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'kms.db'}"

        def make() -> sa.Engine:
            made.append(store.make_engine(url))
            return made[-1]
    else:
        if not POSTGRES:
            pytest.skip("KMS_TEST_POSTGRES_URL is not set")
        admin = sa.create_engine(POSTGRES)
        with admin.begin() as conn:
            conn.execute(sa.text(f'CREATE SCHEMA "{schema}"'))

        def make() -> sa.Engine:
            made.append(sa.create_engine(POSTGRES, connect_args={"options": f"-csearch_path={schema}"}))
            return made[-1]

    store.create_all(make())
    yield make
    for eng in made:
        eng.dispose()
    if admin is not None:
        with admin.begin() as conn:
            conn.execute(sa.text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()


# -- a real server, and calling it ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def service(home: Home) -> Iterator[Service]:
    """``kms serve`` in this process on 127.0.0.1 (a port of its own), with its worker processes; one per module."""
    svc = Service(home.config, listen="127.0.0.1:0")
    yield svc
    svc.stop(grace=0)


def service_client(home: Home, service: Service, who: Principal | str) -> Client:
    """A client of ``service`` as a station (its name) or an officer or auditor (their principal)."""
    path = home.station_config(who) if isinstance(who, str) else home.client_config(who)
    cfg = config.load_station(path).client if isinstance(who, str) else config.load_client(path)
    assert cfg is not None
    return Client(cfg, server=f"localhost:{service.port}", timeout=120)


def kms(*args: str, check: bool = False) -> subprocess.CompletedProcess[str]:
    """The CLI in a process of its own, as a user runs it."""
    result = subprocess.run([sys.executable, "-m", "kms.cli", *args], capture_output=True, text=True,
                            timeout=300, cwd=ROOT, env=dict(os.environ))
    if check:
        assert result.returncode == 0, result.stderr
    return result
