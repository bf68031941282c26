"""kms.config: issuer and station configuration, strictly validated; PINs only by reference."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import yaml

from kms import config
from kms.errors import ConfigError, SecretUnavailable
from kms.secrets import OpenBaoSettings, SecretRef

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


# -- the server section's replica name (docs/deployment.md, "Scale-out") ------------------------------------------


def test_server_replica_is_checked_and_defaults_to_the_host_and_port(tmp_path: Path) -> None:
    tls = {"cert": "pki/server.pem", "key": "pki/server.key", "ca": "pki/ca.pem"}
    plain = config.load(_write(tmp_path / "a" / "kms.yaml", _issuer(server={"listen": "127.0.0.1:7443", "tls": tls})))
    assert plain.server is not None and plain.server.replica is None
    assert config.default_replica(7443).endswith("-7443") and config.REPLICA.fullmatch(config.default_replica(7443))
    named = config.load(_write(tmp_path / "b" / "kms.yaml", _issuer(server={
        "listen": "127.0.0.1:7443", "tls": tls, "replica": "kms-2.dc_a"})))
    assert named.server is not None and named.server.replica == "kms-2.dc_a"
    for bad in ("", "a b", "x" * 65, "kms/1", 7):
        message = _error(config.load, _write(tmp_path / "c" / "kms.yaml", _issuer(server={
            "listen": "127.0.0.1:7443", "tls": tls, "replica": bad})))
        assert "server.replica must be 1 to 64 letters, digits, '.', '_' or '-'" in message, bad


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
                         ({"pan_quota_per_hour": 0}, "worker.pan_quota_per_hour must be an integer from 1"),
                         ({"threads": 4}, "worker: unknown setting 'threads'")):
        assert message in _error(config.load, _write(tmp_path / "w.yaml", _issuer(worker=bad)))
    assert cfg.worker.pan_quota_per_hour == config.DEFAULT_PAN_QUOTA_PER_HOUR
    quota = config.load(_write(tmp_path / "w.yaml", _issuer(worker={"pan_quota_per_hour": 5000})))
    assert quota.worker is not None and quota.worker.pan_quota_per_hour == 5000


# -- the openbao block and what may be a reference (kms.secrets) ----------------------------------------------------

_OPENBAO = {"address": "https://bao.example:8200", "ca_cert": "pki/openbao-ca.pem",
            "approle": {"role_id": "file:openbao/role-id", "secret_id": "file:openbao/secret-id"}}


def test_the_openbao_block(tmp_path: Path) -> None:
    doc = _issuer(openbao=_OPENBAO, domains={"hrss": {"token": "kms-hrss", "pin": "vault:kv/kms/hrss#pin"}},
                  audit={"token": "kms-audit", "pin": "vault:kv/kms/audit#pin"})
    cfg = config.load(_write(tmp_path / "kms.yaml", doc))
    home = tmp_path.resolve()
    assert cfg.openbao == OpenBaoSettings(
        address="https://bao.example:8200", role_id=SecretRef("file", str(home / "openbao" / "role-id")),
        secret_id=SecretRef("file", str(home / "openbao" / "secret-id")), ca_cert=home / "pki" / "openbao-ca.pem",
        approle_mount="approle", cache_seconds=300, timeout_seconds=10.0)
    assert cfg.domains["hrss"].pin == SecretRef("vault", "kv/kms/hrss#pin")
    assert cfg.audit is not None and cfg.audit.pin == SecretRef("vault", "kv/kms/audit#pin")


def test_the_openbao_block_with_a_wrapped_secret_id_and_its_options(tmp_path: Path) -> None:
    block = {"address": "http://127.0.0.1:8200/", "cache_seconds": 60, "timeout_seconds": 3,
             "approle": {"mount": "kms-approle", "role_id": "env:ROLE", "wrapped_secret_id": "file:wrapped"}}
    cfg = config.load(_write(tmp_path / "kms.yaml", _issuer(openbao=block)))
    assert cfg.openbao is not None
    assert (cfg.openbao.address, cfg.openbao.approle_mount, cfg.openbao.cache_seconds, cfg.openbao.timeout_seconds,
            cfg.openbao.secret_id) == ("http://127.0.0.1:8200", "kms-approle", 60, 3.0, None)
    assert cfg.openbao.wrapped_secret_id == SecretRef("file", str(tmp_path.resolve() / "wrapped"))


@pytest.mark.parametrize(("block", "message"), [
    ({**_OPENBAO, "token": "x"}, "openbao: unknown setting 'token'"),
    ({"approle": _OPENBAO["approle"]}, "openbao: missing setting 'address'"),
    ({**_OPENBAO, "address": "bao.example:8200"}, "openbao.address must be an https:// URL"),
    ({**_OPENBAO, "address": "http://bao.example:8200"},
     "openbao.address http://bao.example:8200: plain http is allowed only to a loopback address"),
    ({**_OPENBAO, "address": "http://10.0.0.5:8200"}, "plain http is allowed only to a loopback address"),
    ({**_OPENBAO, "address": "http://127.0.0.1.example.com:8200"}, "plain http is allowed only to a loopback"),
    ({**_OPENBAO, "approle": {"role_id": "file:r"}}, "openbao.approle: secret_id or wrapped_secret_id is needed"),
    ({**_OPENBAO, "approle": {"role_id": "file:r", "secret_id": "env:S", "wrapped_secret_id": "file:w"}},
     "openbao.approle: with wrapped_secret_id, secret_id is the file:PATH the unwrapped secret_id is kept in"),
    ({**_OPENBAO, "approle": {"role_id": CANARY, "secret_id": "file:s"}},
     "openbao.approle.role_id: must be a reference"),
    ({**_OPENBAO, "approle": {"role_id": "file:r", "secret_id": "vault:kv/kms/x#secret_id"}},
     "openbao.approle: the AppRole credentials are env: or file: references"),
    ({**_OPENBAO, "cache_seconds": -1}, "openbao.cache_seconds must be an integer from 0 to 86400"),
])
def test_a_bad_openbao_block_is_named(tmp_path: Path, block: dict[str, Any], message: str) -> None:
    message_got = _error(config.load, _write(tmp_path / "kms.yaml", _issuer(openbao=block)))
    assert message in message_got and CANARY not in message_got


@pytest.mark.parametrize("address", ["https://bao.example:8200", "https://10.0.0.5", "http://127.0.0.1:8200",
                                     "http://127.3.4.5:8200", "http://[::1]:8200", "http://localhost:8200"])
def test_openbao_is_reached_over_https_or_plain_http_on_loopback_only(tmp_path: Path, address: str) -> None:
    cfg = config.load(_write(tmp_path / "kms.yaml", _issuer(openbao={**_OPENBAO, "address": address})))
    assert cfg.openbao is not None and cfg.openbao.address == address


def test_a_vault_reference_without_an_openbao_block_is_refused_at_load(tmp_path: Path) -> None:
    doc = _issuer(domains={"bank": {"token": "kms-bank", "pin": "vault:kv/kms/bank#pin"}})
    path = _write(tmp_path / "kms.yaml", doc)
    assert _error(config.load, path) == (f"{path.resolve()}: domains.bank.pin: a vault reference needs an 'openbao' "
                                         "block in this file")


def test_the_station_and_client_configurations_take_an_openbao_block(tmp_path: Path) -> None:
    station = _station(openbao=_OPENBAO, pin="vault:kv/kms/station/station-a1#pin",
                       client={"server": "kms.example:7443",
                               "tls": {**_TLS, "key": "vault:kv/kms/station/station-a1/tls#key"}})
    cfg = config.load_station(_write(tmp_path / "station.yaml", station))
    assert cfg.openbao is not None and cfg.pin == SecretRef("vault", "kv/kms/station/station-a1#pin")
    assert cfg.client is not None and cfg.client.tls.key == SecretRef("vault", "kv/kms/station/station-a1/tls#key")
    assert cfg.client.tls.openbao == cfg.openbao
    officer = {"openbao": _OPENBAO, "client": {"server": "kms.example:7443",
                                               "tls": {**_TLS, "key": "vault:kv/kms/officer/alice#key"}}}
    client = config.load_client(_write(tmp_path / "alice.yaml", officer))
    assert client.tls.key == SecretRef("vault", "kv/kms/officer/alice#key") and client.tls.openbao is not None


def test_a_tls_key_is_a_path_or_a_vault_reference(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "pki").mkdir()
    (tmp_path / "pki" / "server.key").write_text("PEM FROM FILE")
    server = {"listen": "127.0.0.1:7443", "tls": _TLS}
    cfg = config.load(_write(tmp_path / "kms.yaml", _issuer(server=server)))
    assert cfg.server is not None and cfg.server.tls.key == tmp_path.resolve() / "pki" / "server.key"
    assert cfg.server.tls.private_key("server.tls.key") == b"PEM FROM FILE"
    # A vault: reference with no OpenBao to answer: the error names the setting and the reference.
    server = {"listen": "127.0.0.1:7443", "tls": {**_TLS, "key": "vault:kv/kms/front/tls#key"}}
    block = {"address": "http://127.0.0.1:1", "timeout_seconds": 1,
             "approle": {"role_id": "env:KMS_TEST_ROLE", "secret_id": "env:KMS_TEST_SECRET_ID"}}
    monkeypatch.setenv("KMS_TEST_ROLE", "r")
    monkeypatch.setenv("KMS_TEST_SECRET_ID", CANARY)
    cfg = config.load(_write(tmp_path / "kms.yaml", _issuer(server=server, openbao=block)))
    assert cfg.server is not None
    with pytest.raises(SecretUnavailable) as info:
        cfg.server.tls.private_key("server.tls.key")
    assert str(info.value).startswith("secret reference vault:kv/kms/front/tls#key: openbao.approle: login: OpenBao "
                                      "at http://127.0.0.1:1 is unavailable")
    assert CANARY not in str(info.value)


@pytest.mark.parametrize(("database", "setting"), [
    pytest.param("vault:kv/kms/front/database#url",
                 config.DatabaseSetting(SecretRef("vault", "kv/kms/front/database#url")), id="the URL from OpenBao"),
    pytest.param("env:KMS_DATABASE_URL", config.DatabaseSetting(SecretRef("env", "KMS_DATABASE_URL")),
                 id="the URL from the environment"),
    pytest.param({"url": "postgresql+psycopg://kms@db.example:5432/kms", "password": "vault:kv/kms/front/database#pw"},
                 config.DatabaseSetting("postgresql+psycopg://kms@db.example:5432/kms",
                                        SecretRef("vault", "kv/kms/front/database#pw")), id="the password only"),
    pytest.param({"url": "sqlite:///kms.db"}, None, id="a mapping with only a URL"),
])
def test_the_database_may_be_a_reference(tmp_path: Path, database: Any, setting: Any) -> None:
    cfg = config.load(_write(tmp_path / "kms.yaml", _issuer(database=database, openbao=_OPENBAO)))
    assert cfg.database_setting == (setting or config.DatabaseSetting(f"sqlite:///{tmp_path.resolve() / 'kms.db'}"))


def test_the_database_url_and_password_are_resolved_when_asked_for(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                                                    ) -> None:
    monkeypatch.setenv("KMS_TEST_DB_URL", "postgresql+psycopg://kms:pw@db/kms")
    monkeypatch.setenv("KMS_TEST_DB_PASSWORD", "p@ss/w:rd")
    cfg = config.load(_write(tmp_path / "kms.yaml", _issuer(database="env:KMS_TEST_DB_URL")))
    assert cfg.database == "postgresql+psycopg://kms:pw@db/kms"
    doc = _issuer(database={"url": "postgresql+psycopg://kms@db:5432/kms?sslmode=require",
                            "password": "env:KMS_TEST_DB_PASSWORD"})
    cfg = config.load(_write(tmp_path / "kms.yaml", doc))
    assert cfg.database == "postgresql+psycopg://kms:p%40ss%2Fw%3Ard@db:5432/kms?sslmode=require"
    import sqlalchemy as sa

    assert sa.make_url(cfg.database).password == "p@ss/w:rd"  # what the driver gets
    monkeypatch.setenv("KMS_TEST_DB_URL", CANARY)
    cfg = config.load(_write(tmp_path / "kms.yaml", _issuer(database="env:KMS_TEST_DB_URL")))
    with pytest.raises(ConfigError) as info:
        _ = cfg.database
    assert str(info.value) == "database: the secret env:KMS_TEST_DB_URL is not a database URL"


@pytest.mark.parametrize(("database", "message"), [
    ({"url": "postgresql+psycopg://kms:pw@db/kms", "password": "env:P"}, "database.url has a password already"),
    ({"url": "sqlite:///kms.db", "password": "env:P"}, "database.password goes with a database.url that is a server"),
    ({"url": "env:U", "password": "env:P"}, "database.password goes with a database.url that is a server"),
    ({"url": "postgresql+psycopg://db/kms", "password": CANARY}, "database.password: must be a reference"),
    ({"password": "env:P"}, "database: missing setting 'url'"),
])
def test_a_bad_database_setting_is_named(tmp_path: Path, database: Any, message: str) -> None:
    got = _error(config.load, _write(tmp_path / "kms.yaml", _issuer(database=database)))
    assert message in got and CANARY not in got


@pytest.mark.postgres
def test_a_database_password_from_openbao_reaches_postgresql(openbao: Any, tmp_path: Path) -> None:
    """The password kept in OpenBao (KV v2), merged into a URL written without it: a real PostgreSQL accepts it."""
    url = os.environ.get("KMS_TEST_POSTGRES_URL")
    if not url:
        pytest.skip("KMS_TEST_POSTGRES_URL is not set")
    import sqlalchemy as sa

    from kms import store

    real = sa.make_url(url)
    assert real.password
    where = f"t-db-{os.urandom(3).hex()}"
    openbao.put(f"{where}/database", password=real.password)
    role_id, secret_id = openbao.approle(where, f'path "kv/data/{where}/database" {{ capabilities = ["read"] }}\n')
    (tmp_path / "role-id").write_text(role_id)
    (tmp_path / "secret-id").write_text(secret_id)
    without = sa.engine.URL.create(real.drivername, username=real.username, host=real.host, port=real.port,
                                   database=real.database, query=real.query).render_as_string(hide_password=False)
    doc = _issuer(database={"url": without, "password": f"vault:kv/{where}/database#password"},
                  openbao={"address": openbao.address,
                           "approle": {"role_id": "file:role-id", "secret_id": "file:secret-id"}})
    cfg = config.load(_write(tmp_path / "kms.yaml", doc))
    assert isinstance(cfg.database_setting.url, str) and sa.make_url(cfg.database_setting.url).password is None
    engine = store.make_engine(cfg.database)
    try:
        with engine.connect() as conn:
            assert conn.execute(sa.text("select 1")).scalar_one() == 1
    finally:
        engine.dispose()


# -- client.server: one endpoint or several (kms.client.service balances over them) --------------------------------


@pytest.mark.parametrize(("server", "expected"), [
    ("kms.example:7443", "kms.example:7443"),
    ("kms-1.example:7443, kms-2.example:7443", "kms-1.example:7443,kms-2.example:7443"),
    (["10.0.0.1:7443", "10.0.0.2:7443", "[fd00::3]:7443"], "10.0.0.1:7443,10.0.0.2:7443,[fd00::3]:7443"),
    ("localhost:7443,localhost:7444", "localhost:7443,localhost:7444"),
    ("KMS.Example:7443", "kms.example:7443"),
])
def test_the_client_server_is_one_endpoint_or_a_list(tmp_path: Path, server: Any, expected: str) -> None:
    client = {"server": server, "tls": _TLS}
    cfg = config.load_client(_write(tmp_path / "alice.yaml", {"client": client}))
    assert cfg.server == expected
    assert cfg.endpoints == tuple(config.endpoint(e) for e in expected.split(","))
    station = config.load_station(_write(tmp_path / "station.yaml", _station(client=client)))
    assert station.client is not None and station.client.server == expected


@pytest.mark.parametrize(("server", "reason"), [
    ("kms.example", "'kms.example' has no port (host:port)"),
    ("kms.example:7443,", "an empty endpoint (two commas in a row, or one at an end)"),
    ("a:1,,b:2", "an empty endpoint (two commas in a row, or one at an end)"),
    ([], "must be host:port or a list of them"),
    (7443, "must be host:port or a list of them"),
    (["a:1", 7443], "7443 is not host:port"),
    ("kms.example:0", "'kms.example:0': the port must be a number from 1 to 65535"),
    ("kms.example:65536", "'kms.example:65536': the port must be a number from 1 to 65535"),
    ("kms.example:https", "'kms.example:https': the port must be a number from 1 to 65535"),
    ("kms.example:\uff17443", "'kms.example:\uff17443': the port must be a number from 1 to 65535"),  # a wide 7
    (":7443", "':7443' has no port (host:port)"),
    ("::1:7443", "'::1:7443': an IPv6 address goes in brackets ([::1]:7443)"),
    ("[kms]:7443", "'[kms]:7443': 'kms' in brackets is not an IPv6 address"),
    ("dns:///kms.example:7443", "'dns:///kms.example:7443': 'dns:///kms.example' is not a host name or IP address"),
    ("a:1,b:2,A:1", "a:1 is listed twice"),
    (["[::1]:7443", "[0:0::1]:7443"], "[::1]:7443 is listed twice"),
])
def test_a_malformed_client_server_is_named(tmp_path: Path, server: Any, reason: str) -> None:
    path = _write(tmp_path / "alice.yaml", {"client": {"server": server, "tls": _TLS}})
    assert _error(config.load_client, path) == f"{path.resolve()}: client.server: {reason}"
