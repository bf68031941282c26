"""kms.config: issuer and station configuration, strictly validated; PINs only by reference."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import yaml

from kms import config
from kms.errors import ConfigError
from kms.secrets import SecretRef

CANARY = "Canary-PIN-7f3a9c"


def _issuer(**overrides: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "hsm": {"module": "/opt/hsm/libvendor.so", "softhsm2_conf": "hsm/softhsm2.conf"},
        "domains": {
            "hrss": {"token": "kms-hrss", "pin": "file:pins/hrss.pin"},
            "bank": {"token": "kms-bank", "pin": "env:KMS_BANK_PIN"},
        },
        "database": "sqlite:///kms.db",
        "profiles": "profiles",
        "workers_per_domain": 4,
        "recycle_after_keys": 5000,
    }
    doc.update(overrides)
    return doc


def _station(**overrides: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "station": "station-a1", "bureau": "bureau-a",
        "hsm": {"module": "auto", "softhsm2_conf": "../../hsm/softhsm2.conf"},
        "token": "kms-station-a1", "pin": "file:../../pins/station-a1.pin",
        "trust": "../../trust", "ledger": "sqlite:///ledger.db", "domains": ["hrss", "bank"],
    }
    doc.update(overrides)
    return doc


def _write(path: Path, doc: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(doc, sort_keys=False), encoding="utf-8")
    return path


def _error(loader: Any, path: Path) -> str:
    with pytest.raises(ConfigError) as info:
        loader(path)
    return str(info.value)


# -- issuer configuration ------------------------------------------------------------------------------------------


def test_load_valid_config(tmp_path: Path) -> None:
    path = _write(tmp_path / "etc" / "kms.yaml", _issuer())
    home = (tmp_path / "etc").resolve()
    cfg = config.load(path)
    assert cfg.path == path.resolve()
    assert cfg.home == home
    assert cfg.hsm.module == "/opt/hsm/libvendor.so"
    assert cfg.hsm.softhsm2_conf == home / "hsm" / "softhsm2.conf"
    assert set(cfg.domains) == {"hrss", "bank"}
    assert cfg.domains["hrss"].name == "hrss"
    assert cfg.domains["hrss"].token == "kms-hrss"
    assert cfg.domains["hrss"].pin == SecretRef("file", str(home / "pins" / "hrss.pin"))
    assert cfg.domains["bank"].pin == SecretRef("env", "KMS_BANK_PIN")
    assert cfg.database == f"sqlite:///{home / 'kms.db'}"
    assert cfg.profiles == home / "profiles"
    assert cfg.workers_per_domain == 4
    assert cfg.recycle_after_keys == 5000


def test_load_minimal_config(tmp_path: Path) -> None:
    doc = {"hsm": {}, "domains": {"bank": {"token": "t", "pin": "env:P"}}, "database": "sqlite:///kms.db"}
    cfg = config.load(_write(tmp_path / "kms.yaml", doc))
    assert cfg.hsm.module == "auto"
    assert cfg.hsm.softhsm2_conf is None
    assert set(cfg.domains) == {"bank"}
    assert cfg.profiles == tmp_path.resolve() / "profiles"
    assert cfg.workers_per_domain == 1


def test_config_is_frozen(tmp_path: Path) -> None:
    cfg = config.load(_write(tmp_path / "kms.yaml", _issuer()))
    with pytest.raises(AttributeError):
        cfg.database = "sqlite://"  # type: ignore[misc]


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        pytest.param("sqlite:///kms.db", "sqlite:///{home}/kms.db", id="relative file"),
        pytest.param("sqlite:///data/kms.db", "sqlite:///{home}/data/kms.db", id="relative subdirectory"),
        pytest.param("sqlite:///../shared/kms.db", "sqlite:///{parent}/shared/kms.db", id="relative parent"),
        pytest.param("sqlite:////var/lib/kms/kms.db", "sqlite:////var/lib/kms/kms.db", id="absolute file"),
        pytest.param("sqlite://", "sqlite://", id="in memory"),
        pytest.param("postgresql+psycopg://kms@db/kms", "postgresql+psycopg://kms@db/kms", id="postgres"),
    ],
)
def test_database_url_relative_to_config_directory(tmp_path: Path, url: str, expected: str) -> None:
    home = (tmp_path / "etc").resolve()
    cfg = config.load(_write(tmp_path / "etc" / "kms.yaml", _issuer(database=url)))
    assert cfg.database == expected.format(home=home, parent=home.parent)


@pytest.mark.parametrize("url", ["kms.db", "", 5])
def test_database_must_be_a_url(tmp_path: Path, url: Any) -> None:
    assert "database" in _error(config.load, _write(tmp_path / "kms.yaml", _issuer(database=url)))


def test_absolute_paths_are_kept(tmp_path: Path) -> None:
    doc = _issuer(profiles="/srv/kms/profiles", hsm={"softhsm2_conf": "/etc/softhsm/softhsm2.conf"})
    cfg = config.load(_write(tmp_path / "kms.yaml", doc))
    assert cfg.profiles == Path("/srv/kms/profiles")
    assert cfg.hsm.softhsm2_conf == Path("/etc/softhsm/softhsm2.conf")


def test_relative_paths_do_not_depend_on_the_working_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                                               ) -> None:
    path = _write(tmp_path / "etc" / "kms.yaml", _issuer())
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    cfg = config.load(Path(os.path.relpath(path, elsewhere)))
    assert cfg.profiles == (tmp_path / "etc").resolve() / "profiles"
    assert cfg.database == f"sqlite:///{(tmp_path / 'etc').resolve() / 'kms.db'}"


@pytest.mark.parametrize(
    ("doc", "named"),
    [
        pytest.param(_issuer(listen="0.0.0.0:50051"), "'listen'", id="unknown top-level"),
        pytest.param(_issuer(hsm={"module": "auto", "slot": 0}), "'slot'", id="unknown hsm setting"),
        pytest.param(_issuer(domains={"hrss": {"token": "t", "pin": "env:P", "label": "x"}}), "'label'",
                     id="unknown domain setting"),
        pytest.param(_issuer(domains={"finance": {"token": "t", "pin": "env:P"}}), "'finance'", id="unknown domain"),
    ],
)
def test_unknown_setting_is_named(tmp_path: Path, doc: dict[str, Any], named: str) -> None:
    message = _error(config.load, _write(tmp_path / "kms.yaml", doc))
    assert "unknown setting" in message
    assert named in message


def test_unknown_nested_setting_says_where(tmp_path: Path) -> None:
    message = _error(config.load, _write(tmp_path / "kms.yaml", _issuer(hsm={"slot": 0})))
    assert "hsm" in message
    assert str(tmp_path.resolve() / "kms.yaml") in message


@pytest.mark.parametrize("missing", ["hsm", "domains", "database"])
def test_missing_top_level_setting(tmp_path: Path, missing: str) -> None:
    doc = _issuer()
    del doc[missing]
    message = _error(config.load, _write(tmp_path / "kms.yaml", doc))
    assert "missing setting" in message
    assert f"'{missing}'" in message


@pytest.mark.parametrize("missing", ["token", "pin"])
def test_missing_domain_setting(tmp_path: Path, missing: str) -> None:
    doc = _issuer()
    del doc["domains"]["hrss"][missing]
    message = _error(config.load, _write(tmp_path / "kms.yaml", doc))
    assert f"'{missing}'" in message
    assert "domains.hrss" in message


def test_no_domains(tmp_path: Path) -> None:
    assert "domain" in _error(config.load, _write(tmp_path / "kms.yaml", _issuer(domains={})))


@pytest.mark.parametrize("pin", [CANARY, f"{CANARY}:1234", f"vault:{CANARY}", "env:", "file:"])
def test_literal_pin_rejected_without_echoing_it(tmp_path: Path, pin: str) -> None:
    doc = _issuer()
    doc["domains"]["hrss"]["pin"] = pin
    message = _error(config.load, _write(tmp_path / "kms.yaml", doc))
    assert "domains.hrss.pin" in message
    assert CANARY not in message


def test_numeric_literal_pin_rejected_without_echoing_it(tmp_path: Path) -> None:
    doc = _issuer()
    doc["domains"]["bank"]["pin"] = 73914682
    message = _error(config.load, _write(tmp_path / "kms.yaml", doc))
    assert "domains.bank.pin" in message
    assert "73914682" not in message


@pytest.mark.parametrize(
    ("key", "value"),
    [("workers_per_domain", 0), ("workers_per_domain", 65), ("workers_per_domain", True),
     ("workers_per_domain", "2"), ("recycle_after_keys", 999), ("recycle_after_keys", 2.5)],
)
def test_integer_settings_in_range(tmp_path: Path, key: str, value: Any) -> None:
    assert key in _error(config.load, _write(tmp_path / "kms.yaml", _issuer(**{key: value})))


@pytest.mark.parametrize(
    ("text", "reason"),
    [("- a\n- list\n", "mapping"), ("hsm: [unclosed\n", "not valid YAML"), ("", "mapping")],
)
def test_malformed_file(tmp_path: Path, text: str, reason: str) -> None:
    path = tmp_path / "kms.yaml"
    path.write_text(text, encoding="utf-8")
    message = _error(config.load, path)
    assert reason in message
    assert str(path.resolve()) in message


def test_missing_file(tmp_path: Path) -> None:
    assert "cannot read" in _error(config.load, tmp_path / "absent.yaml")


@pytest.mark.parametrize("section", ["hsm", "domains"])
def test_section_must_be_a_mapping(tmp_path: Path, section: str) -> None:
    message = _error(config.load, _write(tmp_path / "kms.yaml", _issuer(**{section: ["x"]})))
    assert f"{section} must be a mapping" in message


def test_non_utf8_file_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "kms.yaml"
    path.write_bytes(("# 发卡地区配置\n" + yaml.safe_dump(_issuer())).encode("gbk"))
    assert str(path.resolve()) in _error(config.load, path)


def test_apply_env_points_softhsm_at_its_conf(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SOFTHSM2_CONF", raising=False)
    cfg = config.load(_write(tmp_path / "kms.yaml", _issuer()))
    cfg.hsm.apply_env()
    assert os.environ["SOFTHSM2_CONF"] == str(tmp_path.resolve() / "hsm" / "softhsm2.conf")


def test_apply_env_without_conf_leaves_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SOFTHSM2_CONF", "/unchanged")
    cfg = config.load(_write(tmp_path / "kms.yaml", _issuer(hsm={})))
    cfg.hsm.apply_env()
    assert os.environ["SOFTHSM2_CONF"] == "/unchanged"


# -- station configuration -----------------------------------------------------------------------------------------


def test_load_station(tmp_path: Path) -> None:
    path = _write(tmp_path / "stations" / "station-a1" / "station.yaml", _station())
    root = tmp_path.resolve()
    station_dir = root / "stations" / "station-a1"
    cfg = config.load_station(path)
    assert cfg.path == path.resolve()
    assert cfg.name == "station-a1"
    assert cfg.bureau == "bureau-a"
    assert cfg.token == "kms-station-a1"
    assert cfg.domains == ("hrss", "bank")
    assert cfg.hsm.module == "auto"
    assert cfg.hsm.softhsm2_conf is not None
    assert cfg.hsm.softhsm2_conf.resolve() == root / "hsm" / "softhsm2.conf"
    assert cfg.pin.scheme == "file"
    assert Path(cfg.pin.target).resolve() == root / "pins" / "station-a1.pin"
    assert cfg.trust.resolve() == root / "trust"
    assert cfg.ledger == f"sqlite:///{station_dir / 'ledger.db'}"


def test_station_pin_from_environment(tmp_path: Path) -> None:
    cfg = config.load_station(_write(tmp_path / "station.yaml", _station(pin="env:STATION_PIN")))
    assert cfg.pin == SecretRef("env", "STATION_PIN")


@pytest.mark.parametrize("domains", [[], ["finance"], ["hrss", "hsm"], "hrss"])
def test_station_domains(tmp_path: Path, domains: Any) -> None:
    message = _error(config.load_station, _write(tmp_path / "station.yaml", _station(domains=domains)))
    assert "domains" in message


def test_station_unknown_setting(tmp_path: Path) -> None:
    message = _error(config.load_station, _write(tmp_path / "station.yaml", _station(printer="lp0")))
    assert "'printer'" in message


@pytest.mark.parametrize("missing", ["station", "bureau", "token", "pin", "trust", "ledger", "domains", "hsm"])
def test_station_missing_setting(tmp_path: Path, missing: str) -> None:
    doc = _station()
    del doc[missing]
    message = _error(config.load_station, _write(tmp_path / "station.yaml", doc))
    assert f"missing setting '{missing}'" in message


def test_station_literal_pin_rejected_without_echoing_it(tmp_path: Path) -> None:
    message = _error(config.load_station, _write(tmp_path / "station.yaml", _station(pin=CANARY)))
    assert "pin" in message
    assert CANARY not in message


# -- the server section's policy files ---------------------------------------------------------------------------


def test_server_policies_default_to_the_shipped_ones_and_resolve_beside_the_file(tmp_path: Path) -> None:
    tls = {"cert": "pki/server.pem", "key": "pki/server.key", "ca": "pki/ca.pem"}
    plain = config.load(_write(tmp_path / "a" / "kms.yaml", _issuer(server={"listen": "127.0.0.1:7443", "tls": tls})))
    assert plain.server is not None and plain.server.policy is None and plain.server.quorum_policy is None
    named = config.load(_write(tmp_path / "b" / "kms.yaml", _issuer(server={
        "listen": "127.0.0.1:7443", "tls": tls, "policy": "etc/authz.yaml", "quorum_policy": "etc/quorum.yaml"})))
    assert named.server is not None
    assert named.server.policy == (tmp_path / "b" / "etc" / "authz.yaml").resolve()
    assert named.server.quorum_policy == (tmp_path / "b" / "etc" / "quorum.yaml").resolve()
    bad = _issuer(server={"listen": "127.0.0.1:7443", "tls": tls, "quorum": "etc/quorum.yaml"})
    assert "quorum" in _error(config.load, _write(tmp_path / "c" / "kms.yaml", bad))


# -- the server section's capacity (docs/operations.md, "Capacity, limits and retries") ---------------------------

_TLS = {"cert": "pki/server.pem", "key": "pki/server.key", "ca": "pki/ca.pem"}


def _capacity(tmp_path: Path, **settings: Any) -> config.Capacity:
    cfg = config.load(_write(tmp_path / "kms.yaml", _issuer(server={"listen": "127.0.0.1:7443", "tls": _TLS,
                                                                     **settings})))
    assert cfg.server is not None
    return cfg.server.capacity


def test_capacity_defaults_and_what_follows_from_threads(tmp_path: Path) -> None:
    assert _capacity(tmp_path) == config.Capacity(threads=16, max_concurrent_rpcs=128, max_streams=8,
                                                  streams_per_principal=4, calls_per_principal=8)
    # Left out, max_streams and calls_per_principal are half the threads and max_concurrent_rpcs eight times as many.
    assert _capacity(tmp_path, threads=64) == config.Capacity(64, 512, 32, 4, 32)
    assert _capacity(tmp_path, threads=4) == config.Capacity(4, 32, 2, 2, 2)
    assert _capacity(tmp_path, threads=2) == config.Capacity(2, 16, 1, 1, 1)
    assert _capacity(tmp_path, threads=32, max_concurrent_rpcs=40, max_streams=30, streams_per_principal=10,
                     calls_per_principal=3) == config.Capacity(32, 40, 30, 10, 3)


@pytest.mark.parametrize(("settings", "message"), [
    ({"threads": 1}, "server.threads must be an integer from 2 to 1024"),
    ({"threads": "16"}, "server.threads must be an integer from 2 to 1024"),
    ({"threads": True}, "server.threads must be an integer from 2 to 1024"),
    ({"max_streams": 0}, "server.max_streams must be an integer from 1 to 1023"),
    ({"max_streams": 16}, "server.max_streams must be from 1 to server.threads - 1 (15), so that calls other than "
                          "streams always have a thread"),
    ({"streams_per_principal": 9}, "server.streams_per_principal must be from 1 to server.max_streams (8)"),
    ({"max_concurrent_rpcs": 8}, "server.max_concurrent_rpcs must be at least server.threads (16)"),
    ({"calls_per_principal": 16}, "server.calls_per_principal must be from 1 to server.threads - 1 (15), so that one "
                                  "caller's calls never hold every thread"),
    ({"calls_per_principal": 0}, "server.calls_per_principal must be an integer from 1 to 1023"),
    ({"max_concurrent_rpcs": 1.5}, "server.max_concurrent_rpcs must be an integer from 2 to 100000"),
    ({"thread": 16}, "server: unknown setting 'thread'"),
])
def test_capacity_settings_are_checked(tmp_path: Path, settings: dict[str, Any], message: str) -> None:
    path = _write(tmp_path / "kms.yaml", _issuer(server={"listen": "127.0.0.1:7443", "tls": _TLS, **settings}))
    assert _error(config.load, path) == f"{path.resolve()}: {message}"


# -- worker services: the front end's `workers`, a worker's own `worker` section -----------------------------------


_AUDIT = {"token": "kms-audit", "pin": "file:pins/audit.pin"}


def test_a_front_end_with_worker_services_needs_no_pin_for_them(tmp_path: Path) -> None:
    doc = _issuer(domains={"hrss": {"token": "kms-hrss"}, "bank": {"token": "kms-bank", "pin": "env:KMS_BANK_PIN"}},
                  audit={"token": "kms-audit"},
                  workers={"hrss": "unix:run/hrss/worker.sock", "audit": "unix:/run/kms/audit/worker.sock"})
    cfg = config.load(_write(tmp_path / "kms.yaml", doc))
    assert cfg.domains["hrss"].pin is None and cfg.audit is not None and cfg.audit.pin is None
    assert cfg.domains["bank"].pin is not None  # spawned here: its PIN as before
    assert cfg.workers == {"hrss": f"unix:{tmp_path.resolve() / 'run/hrss/worker.sock'}",
                           "audit": "unix:/run/kms/audit/worker.sock"}
    without = {**doc, "workers": {"audit": "unix:/run/kms/audit/worker.sock"}}  # hrss spawned: its PIN is needed
    assert "domains.hrss: missing setting 'pin'" in _error(config.load, _write(tmp_path / "k2.yaml", without))
    no_audit = {**doc, "workers": {"hrss": "unix:/run/h.sock"}}
    assert "audit: missing setting 'pin'" in _error(config.load, _write(tmp_path / "k3.yaml", no_audit))


@pytest.mark.parametrize(("workers", "message"), [
    ({"hsm": "unix:/run/x.sock"}, "workers: unknown setting 'hsm'"),
    ({"hrss": "127.0.0.1:7000"}, "workers.hrss must be unix:PATH"),
    ({"hrss": "unix:"}, "workers.hrss must be unix:PATH"),
    ({"hrss": f"unix:/{'x' * 120}"}, "workers.hrss: the socket path is longer than 107 bytes"),
    ({"audit": "unix:/run/a.sock"}, "workers.audit: there is no 'audit' section"),
])
def test_bad_worker_endpoints_are_named(tmp_path: Path, workers: dict[str, str], message: str) -> None:
    assert message in _error(config.load, _write(tmp_path / "kms.yaml", _issuer(workers=workers)))


def test_a_worker_endpoint_needs_its_domain_configured(tmp_path: Path) -> None:
    doc = _issuer(domains={"hrss": {"token": "kms-hrss", "pin": "file:p"}}, workers={"bank": "unix:/run/b.sock"})
    assert "workers.bank: the bank domain is not configured (domains.bank)" in _error(
        config.load, _write(tmp_path / "kms.yaml", doc))


def test_a_worker_configuration_holds_its_own_domain_or_only_the_audit_section(tmp_path: Path) -> None:
    audit_only = {k: v for k, v in _issuer(audit=_AUDIT, worker={"listen": "unix:s/audit.sock",
                                                                  "socket_group": "kms-front"}).items()
                  if k != "domains"}
    cfg = config.load(_write(tmp_path / "worker-audit.yaml", audit_only))
    assert cfg.domains == {} and cfg.audit is not None and cfg.audit.pin is not None
    assert cfg.worker == config.WorkerConfig(f"unix:{tmp_path.resolve() / 's/audit.sock'}", "kms-front")
    served = {k: v for k, v in _issuer(server={"listen": "127.0.0.1:0", "tls": {}}, audit=_AUDIT).items()
              if k != "domains"}  # kms serve's configuration still needs its domains
    assert "top level: missing setting 'domains'" in _error(config.load, _write(tmp_path / "kms.yaml", served))
    for bad, message in (({"listen": "/run/x.sock"}, "worker.listen must be unix:PATH"),
                         ({"socket_group": ""}, "worker.socket_group must be a group name"),
                         ({"threads": 4}, "worker: unknown setting 'threads'")):
        assert message in _error(config.load, _write(tmp_path / "w.yaml", _issuer(worker=bad)))
