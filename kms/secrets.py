"""Secrets (PINs, passwords, private keys) are given by reference, never as literals in configuration.

A reference is ``env:NAME`` (an environment variable), ``file:PATH`` (a file holding the secret on its first line; a
relative path is taken from the configuration file's directory) or ``vault:<mount>/<path>#<field>`` (field
``<field>`` of the KV version 2 secret ``<path>`` on mount ``<mount>`` of OpenBao or Vault, read with the AppRole of
the configuration's ``openbao`` block). Resolution happens only in the process that needs the secret, e.g. a
domain's HSM worker, never in a front end: ``kms.config.Config.secret`` (and ``StationConfig.secret``) resolve any
reference through ``resolve`` below.

**OpenBao, per process.** Each process has one ``OpenBao`` client per ``openbao`` block (``client_for``), logged in
lazily with AppRole the first time a ``vault:`` reference is resolved. Its token is renewed (``renew-self``) when
less than a third of its TTL is left, at the next use; when the token is not renewable, renewal fails, or the
renewal was cut short by the token's max TTL, the client logs in again. A response-wrapped secret_id
(``wrapped_secret_id``) is unwrapped once, at the first login, and the wrapping token is then spent: the secret_id
is kept in this process's memory only — or, when ``secret_id: file:PATH`` is configured as well (a service of
several processes: a domain's worker pool), in that file (0600), written by the first process under a lock and read
by the others.

**Cache rule.** KV version 2 secrets have no lease. A value read from OpenBao is used for at most
``openbao.cache_seconds`` (default 300 s) and never past the expiry of the token it was read with (being allowed to
read it ends with the token); within that time it is served from memory without asking OpenBao, so that an OpenBao
outage does not stop a process that already has its secrets. After that it is read again; if OpenBao cannot be
reached then (or is sealed), resolution raises ``SecretUnavailable`` (retryable, gRPC UNAVAILABLE).

**Errors** name the reference and the cause, never the value, the secret_id or a token: a missing secret or field, a
denied read (403), a refused login are ``ConfigError`` (an operator must fix the policy, the path or the
credentials); an unreachable or sealed OpenBao is ``SecretUnavailable``, naming its address.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import ipaddress
import logging
import os
import re
import threading
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kms.clock import Clock, SystemClock
from kms.errors import ConfigError, SecretUnavailable
from kms.files import write_private

SCHEMES = ("env", "file", "vault")
#: ``vault:<mount>/<path>#<field>``: a mount and a path of plain segments, a field name.
_VAULT = re.compile(r"(?P<mount>[A-Za-z0-9_.-]+)/(?P<path>[A-Za-z0-9_.-]+(?:/[A-Za-z0-9_.-]+)*)#(?P<field>[^#\s]+)")
#: Renew the token when less than this share of its TTL is left.
RENEW_WHEN_LEFT = 1 / 3
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SecretRef:
    scheme: str
    target: str

    @classmethod
    def parse(cls, text: str, *, base_dir: Path | None = None, field: str = "pin") -> SecretRef:
        scheme, sep, target = text.partition(":")
        if not sep or scheme not in SCHEMES or not target:
            raise ConfigError(
                f"{field}: must be a reference 'env:NAME', 'file:PATH' or 'vault:MOUNT/PATH#FIELD', never a literal "
                "secret"
            )
        if scheme == "vault" and _VAULT.fullmatch(target) is None:
            raise ConfigError(f"{field}: a vault reference is 'vault:<mount>/<path>#<field>' (KV version 2), "
                              "e.g. vault:kv/kms/hrss#pin")
        if scheme == "file" and base_dir is not None and not os.path.isabs(target):
            target = str(base_dir / target)
        return cls(scheme, target)

    @property
    def vault_parts(self) -> tuple[str, str, str]:
        """(mount, path, field) of a ``vault:`` reference."""
        match = _VAULT.fullmatch(self.target) if self.scheme == "vault" else None
        if match is None:
            raise ValueError(f"not a vault reference: {self}")
        return match["mount"], match["path"], match["field"]

    def resolve(self) -> str:
        """The value of an ``env:`` or ``file:`` reference. Errors name the reference, never the value. A
        ``vault:`` reference needs the configuration's ``openbao`` block: resolve it with ``Config.secret``."""
        if self.scheme == "vault":
            raise ConfigError(f"secret reference {self}: a vault reference needs an 'openbao' block in the "
                              "configuration")
        if self.scheme == "env":
            value = os.environ.get(self.target)
            if value is None or value == "":
                raise ConfigError(f"secret reference {self}: environment variable is not set")
            return value
        try:
            text = Path(self.target).read_bytes().decode("utf-8")
        except OSError as exc:
            raise ConfigError(f"secret reference {self}: cannot read file ({exc.strerror})") from None
        except UnicodeDecodeError:
            raise ConfigError(f"secret reference {self}: file is not UTF-8 text") from None
        value = text.splitlines()[0].strip() if text.strip() else ""
        if not value:
            raise ConfigError(f"secret reference {self}: file is empty")
        return value

    def __str__(self) -> str:
        return f"{self.scheme}:{self.target}"


@dataclass(frozen=True)
class OpenBaoSettings:
    """The ``openbao`` block of a configuration file: where OpenBao is and how this process logs in (AppRole)."""

    address: str
    role_id: SecretRef
    secret_id: SecretRef | None = None
    wrapped_secret_id: SecretRef | None = None
    ca_cert: Path | None = None
    approle_mount: str = "approle"
    cache_seconds: int = 300
    timeout_seconds: float = 10.0

    def __post_init__(self) -> None:
        check_address(self.address)
        if self.secret_id is None and self.wrapped_secret_id is None:
            raise ConfigError("openbao.approle: secret_id or wrapped_secret_id is needed")
        if self.secret_id is not None and self.wrapped_secret_id is not None and (
                self.secret_id.scheme != "file" or self.wrapped_secret_id.scheme != "file"):
            raise ConfigError("openbao.approle: with wrapped_secret_id, secret_id is the file:PATH the unwrapped "
                              "secret_id is kept in")
        for ref in (self.role_id, self.secret_id, self.wrapped_secret_id):
            if ref is not None and ref.scheme == "vault":
                raise ConfigError("openbao.approle: the AppRole credentials are env: or file: references")


def check_address(address: str, setting: str = "openbao.address") -> str:
    """``address`` if OpenBao may be reached there: https, or plain http to a loopback address only (127.0.0.0/8,
    ::1, localhost): over any other network a token, a secret_id and the secrets themselves would travel in clear.
    ConfigError naming ``setting`` otherwise."""
    try:
        parsed = urllib.parse.urlsplit(address)
        host = parsed.hostname or ""
    except ValueError:
        parsed, host = None, ""
    if parsed is None or parsed.scheme not in ("http", "https") or not host:
        raise ConfigError(f"{setting} must be an https:// URL (http:// only to a loopback address), not {address!r}")
    if parsed.scheme == "http" and not _loopback(host):
        raise ConfigError(f"{setting} {address}: plain http is allowed only to a loopback address (127.0.0.0/8, ::1, "
                          "localhost); use https:// (and openbao.ca_cert) to reach OpenBao over a network")
    return address


def _loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _reason(error: BaseException) -> str:
    """A few words on why a request to OpenBao failed: its status, or the kind of connection failure. Never the
    request (it may carry a secret_id) nor the response body."""
    status = getattr(error, "status_code", None)
    name = type(error).__name__
    words = {"InvalidRequest": "invalid request (400)", "Unauthorized": "unauthorized (401)",
             "Forbidden": "permission denied (403)", "InvalidPath": "not found (404)",
             "RateLimitExceeded": "rate limited (429)", "InternalServerError": "internal server error (500)",
             "VaultNotInitialized": "not initialized (501)", "BadGateway": "bad gateway (502)",
             "VaultDown": "sealed or in standby (503)"}
    if name in words:
        return words[name]
    if "Timeout" in name:
        return "timed out"
    if "SSL" in name:
        return "TLS handshake failed"
    if "Connection" in name:
        return "connection refused" if "refused" in str(error).lower() else "cannot connect"
    return f"{name}{f' {status}' if status else ''}"


def _is_outage(error: BaseException) -> bool:
    """OpenBao cannot answer now (not reachable, sealed, a server error): retryable, unlike a refusal."""
    import hvac.exceptions as hx
    import requests

    return isinstance(error, (requests.exceptions.RequestException, hx.VaultDown, hx.InternalServerError,
                              hx.BadGateway, hx.RateLimitExceeded, hx.VaultNotInitialized))


class OpenBao:
    """One process's client of one OpenBao (or Vault) server: AppRole login, token renewal, KV v2 reads with the
    per-process cache (module docstring). Thread-safe. ``client()`` gives the logged-in hvac client to other
    modules that talk to OpenBao themselves (the audit anchor)."""

    def __init__(self, settings: OpenBaoSettings, *, clock: Clock | None = None,
                 make_client: Callable[..., Any] | None = None) -> None:
        self.settings = settings
        self._clock = clock or SystemClock()
        self._make_client = make_client
        self._lock = threading.RLock()
        self._hvac: Any = None
        self._secret_id: str | None = None  # the unwrapped secret_id, in memory only
        self._token_ttl = 0  # seconds, as granted at login
        self._token_expires: dt.datetime | None = None
        self._renewable = False
        self._cache: dict[SecretRef, tuple[str, dt.datetime]] = {}
        self.logins = 0
        self.renewals = 0

    # -- the token ------------------------------------------------------------------------------------------------

    def _new_client(self) -> Any:
        import hvac

        verify: bool | str = str(self.settings.ca_cert) if self.settings.ca_cert is not None else True
        factory = self._make_client or hvac.Client
        return factory(url=self.settings.address, verify=verify, timeout=self.settings.timeout_seconds)

    def _unwrapping_client(self, wrapping: str) -> Any:
        client = self._new_client()
        client.token = wrapping  # the wrapping token authenticates its own unwrap, and is spent by it
        return client

    def _unavailable(self, what: str, error: BaseException) -> SecretUnavailable:
        return SecretUnavailable(f"{what}: OpenBao at {self.settings.address} is unavailable ({_reason(error)}); "
                                 "try again later")

    def _credentials(self) -> tuple[str, str]:
        settings = self.settings
        role_id = settings.role_id.resolve()
        if self._secret_id is not None:
            return role_id, self._secret_id
        if settings.wrapped_secret_id is None:
            assert settings.secret_id is not None
            return role_id, settings.secret_id.resolve()
        if settings.secret_id is None:
            self._secret_id = self._unwrap()  # the wrapping token is spent: keep what it held, in memory only
            return role_id, self._secret_id
        # Both: the first process to start unwraps and keeps the secret_id in the secret_id file (0600), for the
        # other processes of the service (a domain's worker pool, its replacements); one at a time.
        kept = Path(settings.secret_id.target)
        try:
            with open(settings.wrapped_secret_id.target, "rb") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)
                if not (kept.is_file() and kept.read_text(encoding="utf-8").strip()):
                    write_private(kept, self._unwrap() + "\n")
                    log.info("openbao: the wrapped secret_id was unwrapped; it is kept in %s", kept)
        except OSError as error:
            raise ConfigError(f"openbao.approle: {settings.wrapped_secret_id} or {settings.secret_id}: cannot be "
                              f"read or written ({error.strerror})") from None
        return role_id, settings.secret_id.resolve()

    def _unwrap(self) -> str:
        settings = self.settings
        assert settings.wrapped_secret_id is not None
        wrapping = settings.wrapped_secret_id.resolve()
        try:
            response = self._unwrapping_client(wrapping).sys.unwrap()
            secret_id = str(response["data"]["secret_id"])
        except Exception as error:
            if _is_outage(error):
                raise self._unavailable("openbao.approle.wrapped_secret_id", error) from None
            raise ConfigError(
                f"openbao.approle.wrapped_secret_id ({settings.wrapped_secret_id}): OpenBao at {settings.address} "
                f"did not unwrap it ({_reason(error)}): a response-wrapped secret_id can be unwrapped once only, "
                "and this one was already unwrapped or has expired; ask for a new one") from None
        return secret_id

    def _login(self) -> None:
        role_id, secret_id = self._credentials()
        client = self._new_client()
        try:
            auth = client.auth.approle.login(role_id=role_id, secret_id=secret_id,
                                             mount_point=self.settings.approle_mount)["auth"]
        except Exception as error:
            if _is_outage(error):
                raise self._unavailable("openbao.approle: login", error) from None
            source = self.settings.secret_id or self.settings.wrapped_secret_id
            raise ConfigError(
                f"openbao.approle: OpenBao at {self.settings.address} refused the AppRole login on "
                f"auth/{self.settings.approle_mount} ({_reason(error)}): check role_id ({self.settings.role_id}) and "
                f"secret_id ({source}); a secret_id may have expired or run out of uses") from None
        self._hvac = client
        self._token_ttl = int(auth.get("lease_duration") or 0)
        self._renewable = bool(auth.get("renewable"))
        self._token_expires = self._clock.now() + dt.timedelta(seconds=self._token_ttl)
        self.logins += 1
        log.info("openbao: logged in at %s with AppRole (token TTL %d s, %s)", self.settings.address,
                 self._token_ttl, "renewable" if self._renewable else "not renewable")

    def _renew(self) -> None:
        """renew-self; a new login when the token cannot be renewed or the renewal was cut short (max TTL)."""
        if self._renewable:
            try:
                auth = self._hvac.auth.token.renew_self()["auth"]
                granted = int(auth.get("lease_duration") or 0)
                if granted >= self._token_ttl:
                    self._token_expires = self._clock.now() + dt.timedelta(seconds=granted)
                    self.renewals += 1
                    log.info("openbao: token renewed (TTL %d s)", granted)
                    return
                log.info("openbao: the token reached its max TTL; logging in again")
            except Exception as error:
                if _is_outage(error):
                    raise self._unavailable("openbao: token renewal", error) from None
                log.info("openbao: the token could not be renewed (%s); logging in again", _reason(error))
        self._login()

    def _ensure_token(self) -> None:
        if self._hvac is None or self._token_expires is None:
            self._login()
            return
        if self._token_ttl == 0:
            return  # a token that does not expire (no TTL): nothing to renew
        left = (self._token_expires - self._clock.now()).total_seconds()
        if left <= self._token_ttl * RENEW_WHEN_LEFT:
            self._renew()

    def client(self) -> Any:
        """The hvac client, logged in, its token renewed if due (SecretUnavailable, ConfigError as for a read)."""
        with self._lock:
            self._ensure_token()
            return self._hvac

    # -- secrets --------------------------------------------------------------------------------------------------

    def read(self, ref: SecretRef) -> str:
        """The value of a ``vault:`` reference (module docstring: cache rule, errors)."""
        mount, path, field = ref.vault_parts
        with self._lock:
            cached = self._cache.get(ref)
            now = self._clock.now()
            if cached is not None and now < cached[1]:
                return cached[0]
            self._cache.pop(ref, None)
            try:
                self._ensure_token()
                data = self._read_once_more_if_forbidden(ref)
            except (ConfigError, SecretUnavailable) as error:
                if str(error).startswith(f"secret reference {ref}:"):
                    raise
                raise type(error)(f"secret reference {ref}: {error}") from None
            value = data.get(field)
            if not isinstance(value, str) or value == "":
                present = ", ".join(sorted(str(k) for k in data)) or "none"
                raise ConfigError(f"secret reference {ref}: the secret {mount}/{path} has no field {field!r} "
                                  f"(fields: {present})" if field not in data else
                                  f"secret reference {ref}: field {field!r} is empty or not text")
            assert self._token_expires is not None
            expires = self._clock.now() + dt.timedelta(seconds=self.settings.cache_seconds)
            if self._token_ttl:
                expires = min(expires, self._token_expires)
            self._cache[ref] = (value, expires)
            return value

    def _read_once_more_if_forbidden(self, ref: SecretRef) -> dict[str, Any]:
        """The secret's data. Refused with 403, perhaps because our token was revoked: one new login, one more try
        (a path the policy denies is refused again, and named)."""
        import hvac.exceptions as hx

        mount, path, _ = ref.vault_parts
        try:
            return self._read(mount, path)
        except Exception as error:
            if not isinstance(error, hx.Forbidden):
                raise self._read_error(ref, error) from None
        self._login()
        try:
            return self._read(mount, path)
        except Exception as error:
            raise self._read_error(ref, error) from None

    def _read(self, mount: str, path: str) -> dict[str, Any]:
        response = self._hvac.secrets.kv.v2.read_secret_version(path=path, mount_point=mount,
                                                                raise_on_deleted_version=True)
        data = response["data"]["data"]
        return data if isinstance(data, dict) else {}

    def _read_error(self, ref: SecretRef, error: BaseException) -> Exception:
        import hvac.exceptions as hx

        if _is_outage(error):
            return self._unavailable(f"secret reference {ref}", error)
        mount, path, _ = ref.vault_parts
        if isinstance(error, hx.Forbidden):
            return ConfigError(f"secret reference {ref}: OpenBao at {self.settings.address} denied reading "
                               f"{mount}/data/{path} (403): this process's AppRole policy does not allow it")
        if isinstance(error, hx.InvalidPath):
            return ConfigError(f"secret reference {ref}: no secret {mount}/{path} in OpenBao at "
                               f"{self.settings.address} (404; deleted, or never written)")
        return ConfigError(f"secret reference {ref}: OpenBao at {self.settings.address} refused the read "
                           f"({_reason(error)})")


_clients: dict[OpenBaoSettings, OpenBao] = {}
_clients_pid = os.getpid()
_clients_lock = threading.Lock()


def client_for(settings: OpenBaoSettings) -> OpenBao:
    """This process's OpenBao client for ``settings`` (one per process: a forked child makes its own)."""
    global _clients_pid
    with _clients_lock:
        if _clients_pid != os.getpid():
            _clients.clear()
            _clients_pid = os.getpid()
        client = _clients.get(settings)
        if client is None:
            client = _clients[settings] = OpenBao(settings)
        return client


def resolve(ref: SecretRef, openbao: OpenBaoSettings | None, where: str | None = None) -> str:
    """The value of any reference: ``env:`` and ``file:`` directly, ``vault:`` through this process's client for
    ``openbao`` (ConfigError naming ``where``, the configuration file, when there is no ``openbao`` block)."""
    if ref.scheme != "vault":
        return ref.resolve()
    if openbao is None:
        raise ConfigError(f"secret reference {ref}: a vault reference needs an 'openbao' block in "
                          f"{where or 'the configuration'}")
    return client_for(openbao).read(ref)
