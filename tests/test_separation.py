"""Each key domain, the audit signer and the front end as OS users of their own (issue 12, scope 3; run as root).

A development home is split into the layout of docs/deployment.md (kms.dev.separation) for four fresh system users;
`kms worker --domain hrss`, `--domain bank` and `kms worker --audit` run as the domains' and the audit signer's
users, `kms serve` as the front end's, with the workers' Unix sockets in its kms.yaml and no PIN. A batch is issued
end to end (a station fetches and opens every bundle) and an auditor's export verifies against the audit key. Then
who can read which secret is measured by trying, as each user, in a child process (never computed from modes), and
printed: the tables in docs/deployment.md, "Who can read what", are this output. All of it twice: the PINs in files
(0400, each its user's), then in OpenBao (a real server; each user, the front end's too, an AppRole of its own bound
to the shipped policy of its name).

CI runs the suite as root; elsewhere the module is skipped, saying so.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from helpers import ROOT, card, client, officer, open_batch
from openbao import BaoServer

from kms.dev.home import Home, init_home
from kms.dev.separation import (
    AUDIT,
    FRONT,
    SIGNERS,
    AppRole,
    Layout,
    PinSource,
    ServiceUsers,
    database_writers,
    ensure_users,
    format_matrix,
    openbao_readability,
    readability,
    remove_users,
    run_as,
    searchable,
    separate,
)
from kms.dev.services import process_tree
from kms.errors import ConfigError
from kms.secrets import SCHEMES

pytestmark = [
    pytest.mark.osusers,
    pytest.mark.skipif(os.geteuid() != 0, reason="creates OS users and runs services as them: needs root (CI runs "
                                                  "the suite as root)"),
]

BUREAU, STATION = "bureau-b", "station-b1"


@dataclass
class Deployment:
    home: Home
    layout: Layout
    users: ServiceUsers
    work: Path
    openbao: BaoServer | None = None  # the PINs are in OpenBao (each user its own AppRole), not in files

    def user_list(self) -> list[str]:
        return list(self.users.all().values())


#: The KV v2 secret of each component's PIN, as the shipped policies (deploy/openbao/kms-<component>.hcl) name it.
PIN_PATHS = {f"{c} PIN in OpenBao": f"kv/kms/{c}" for c in SIGNERS}
POLICIES = ROOT / "deploy" / "openbao"


def _openbao_pins(bao: BaoServer, users: ServiceUsers) -> tuple[dict[str, PinSource], dict[str, AppRole]]:
    """Each component's PIN at kv/kms/<component>#pin, and each component (the front end too) an AppRole of its
    own bound to the shipped policy of its name."""
    approles = {}
    for component in (FRONT, *SIGNERS):
        policy = (POLICIES / f"kms-{component}.hcl").read_text(encoding="utf-8")
        approles[component] = AppRole(*bao.approle(users.of(component), policy))

    def store(component: str) -> Callable[[str], None]:
        return lambda pin: bao.put(f"kms/{component}", pin=pin)

    sources = {c: PinSource(f"vault:kv/kms/{c}#pin", AppRole.block(bao.address), store(c)) for c in SIGNERS}
    return sources, approles


@pytest.fixture(scope="module", params=["file", "openbao"])
def deployment(request: pytest.FixtureRequest) -> Iterator[Deployment]:
    """A development home split for four new system users (unique names), under a directory every user can
    search; users, groups and files removed afterwards. The interpreter and this checkout are made searchable to
    the service users while the module runs (kms.dev.separation.searchable: a pyenv Python under /root).
    Twice: the PINs in files (0400, each its user's), then in OpenBao (each user reading its own with its own
    AppRole, the shipped policies)."""
    bao: BaoServer | None = None
    if request.param == "openbao":
        if "vault" not in SCHEMES or not POLICIES.is_dir():
            pytest.skip("vault: references (kms.secrets) and deploy/openbao/ come from the secrets helper's branch "
                        "(i12-secrets), not merged into this tree yet")
        bao = request.getfixturevalue("openbao")
    work = Path(tempfile.mkdtemp(prefix="kms-separation-", dir="/tmp"))
    os.chmod(work, 0o755)
    users = ServiceUsers.prefixed(f"kmst{secrets.token_hex(3)}")
    created: list[str] = []
    try:
        home = init_home(work / "home", bureaus={"bureau-a": ("station-a1",), BUREAU: (STATION,)})
        created = ensure_users(users)
        sources, approles = _openbao_pins(bao, users) if bao is not None else ({}, {})
        needed = [Path(sys.executable), Path(sys.prefix), Path(sys.base_prefix), ROOT / "kms", work]
        with searchable(users.all().values(), needed):
            layout = separate(home, work / "srv", users, pin_sources=sources, approles=approles)
            yield Deployment(home, layout, users, work, bao)
    finally:
        remove_users(created)
        shutil.rmtree(work, ignore_errors=True)


def _env() -> dict[str, str]:
    """The services' whole environment: nothing of the test's but where the module and the code are (no PIN could
    come through it)."""
    env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "PYTHONDONTWRITEBYTECODE": "1"}
    for name in ("KMS_PKCS11_MODULE", "PYTHONPATH"):
        if name in os.environ:
            env[name] = os.environ[name]
    return env


class Services:
    """The three workers and the front end, each as its user; stopped (SIGTERM) in reverse order."""

    def __init__(self, d: Deployment) -> None:
        self.d = d
        self.procs: dict[str, subprocess.Popen[str]] = {}
        self.logs = d.work / "logs"
        self.logs.mkdir(exist_ok=True)

    def start(self, name: str, user: str, cwd: Path, *args: str) -> subprocess.Popen[str]:
        with open(self.logs / f"{name}.err", "w", encoding="utf-8") as err:
            proc = subprocess.Popen([sys.executable, "-m", "kms.cli", *args], cwd=cwd, env=_env(), text=True,
                                    stdout=subprocess.PIPE, stderr=err, **run_as(user))
        self.procs[name] = proc
        return proc

    def stderr(self, name: str) -> str:
        return (self.logs / f"{name}.err").read_text(encoding="utf-8")

    def first_line(self, name: str) -> str:
        """The first line the service prints (once it listens); "" if it ended first."""
        stdout = self.procs[name].stdout
        assert stdout is not None
        return stdout.readline()

    def stop(self) -> dict[str, int]:
        codes = {}
        for name, proc in reversed(self.procs.items()):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
            try:
                codes[name] = proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                codes[name] = proc.wait()
        return codes


@pytest.fixture(scope="module")
def running(deployment: Deployment) -> Iterator[tuple[Services, int]]:
    """The workers, then the front end (its port from its first line)."""
    d = deployment
    services = Services(d)
    try:
        for component in SIGNERS:
            which = ["--audit"] if component == AUDIT else ["--domain", component]
            services.start(component, d.users.of(component), d.layout.dir(component), "worker", *which,
                           "--config", str(d.layout.worker_config(component)))
        for component in SIGNERS:
            line = services.first_line(component)
            assert line.strip() == f"kms: worker {component} serving on unix:{d.layout.socket(component)}", \
                (line, services.stderr(component))
        services.start("front", d.users.front, d.layout.dir("front"), "serve", "--config", str(d.layout.front_config),
                       "--listen", "127.0.0.1:0")
        line = services.first_line("front")
        assert line.startswith("kms: serving on port "), (line, services.stderr("front"))
        yield services, int(line.rsplit(" ", 1)[1])
    finally:
        codes = services.stop()
    assert all(code == 0 for code in codes.values()), (codes, {n: services.stderr(n)[-2000:] for n in codes})


def _uids(pid: int) -> tuple[int, ...]:
    """Real, effective, saved and filesystem uid of a process, from /proc."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Uid:"):
            return tuple(int(v) for v in line.split()[1:])
    raise AssertionError(f"/proc/{pid}/status: no Uid line")


def _pins(d: Deployment) -> dict[str, str]:
    """Each component's PIN, from its file or from OpenBao (read with the root token)."""
    if d.openbao is not None:
        kv = d.openbao.client().secrets.kv.v2
        return {c: str(kv.read_secret_version(path=f"kms/{c}", mount_point="kv", raise_on_deleted_version=True)
                       ["data"]["data"]["pin"]) for c in SIGNERS}
    return {c: d.layout.pin_file(c).read_text(encoding="utf-8").strip() for c in SIGNERS}


def test_a_batch_is_issued_end_to_end_by_services_under_their_own_users(
        deployment: Deployment, running: tuple[Services, int], tmp_path: Path) -> None:
    d, (_, port) = deployment, running
    creator = client(d.home, port, officer("hrss", 0))
    status = open_batch(d.home, port, creator, "B-sep", BUREAU, "dual-app-v1", [card(i) for i in range(3)])
    assert status.state == "open", status
    out = tmp_path / "bundles"
    fetched = subprocess.run([sys.executable, "-m", "kms.cli", "station", "fetch", "--station-config",
                              str(d.home.station_config(STATION)), "--server", f"localhost:{port}", "--batch-id",
                              "B-sep", "--out", str(out), "--open", "--json"],
                             capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert fetched.returncode == 0, fetched.stderr
    report = json.loads(fetched.stdout)
    assert report["fetched"] == report["opened"] == 3
    assert report["keys"] == report["kcv_matches"] > 0

    # The audit signer (its own user, its own token) signed the chain: an auditor's export verifies.
    export = tmp_path / "audit.jsonl"
    exported = subprocess.run([sys.executable, "-m", "kms.cli", "audit", "export", "--client",
                               str(d.home.path / "clients" / "auditor-erin.yaml"), "--server", f"localhost:{port}",
                               "-o", str(export)], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert exported.returncode == 0, exported.stderr
    verified = subprocess.run([sys.executable, "-m", "kms.cli", "audit", "verify", str(export), "--public-key",
                               str(d.home.path / "audit" / "audit-v1.pem")], capture_output=True, text=True,
                              timeout=300, cwd=ROOT)
    assert verified.returncode == 0, verified.stderr


def test_each_service_runs_as_its_user_and_the_front_end_holds_no_pin(
        deployment: Deployment, running: tuple[Services, int]) -> None:
    d, (services, _) = deployment, running
    pins = _pins(d)
    assert set(pins) == set(SIGNERS)
    for component in SIGNERS:  # the service and its worker processes (those logged into the token)
        uid = run_as(d.users.of(component))["user"]
        tree = process_tree(services.procs[component].pid)
        assert len(tree) >= 2, (component, tree)
        assert all(set(_uids(pid)) == {uid} for pid in tree), (component, {pid: _uids(pid) for pid in tree})
    # Nothing secret in the front end's environment, nor in anything a service wrote to stderr: no PIN, no
    # secret_id of any AppRole.
    approles = [d.layout.approle(c) for c in ("front", *SIGNERS)]
    secret_ids = [found[1].read_text(encoding="utf-8").strip() for found in approles if found is not None]
    assert len(secret_ids) == (4 if d.openbao else 0)
    values = [*pins.values(), *secret_ids]
    front_uid = run_as(d.users.front)["user"]
    for pid in process_tree(services.procs["front"].pid):
        assert set(_uids(pid)) == {front_uid}
        environ = Path(f"/proc/{pid}/environ").read_bytes()
        assert not any(value.encode() in environ for value in values)
        assert b"PIN" not in environ.upper()
    for name in services.procs:
        assert not any(value in services.stderr(name) for value in values), name


def test_who_can_read_what(deployment: Deployment, running: tuple[Services, int]) -> None:
    """Measured as each user while the services run (a socket counts as read if the user can connect to it; a PIN
    in OpenBao if the user's own AppRole may read it); printed (the closing note and docs/deployment.md quote it)."""
    d = deployment
    users = d.user_list()
    secrets_ = d.layout.secrets()
    matrix = readability(users, secrets_)
    expected = d.layout.expected_readers()
    if d.openbao is not None:  # each PIN in OpenBao, none in a file; each user its own AppRole credentials
        assert not any(d.layout.pin_file(c).exists() for c in SIGNERS)
        assert {f"{c} AppRole secret_id" for c in ("front", *SIGNERS)} <= set(secrets_)
        matrix |= openbao_readability(d.layout, d.openbao.address, PIN_PATHS)
        expected |= {f"{c} PIN in OpenBao": {d.users.of(c)} for c in SIGNERS}
    pin = {c: f"{c} PIN in OpenBao" if d.openbao is not None else f"{c} PIN" for c in SIGNERS}
    assert {pin[c] for c in SIGNERS} | {f"{c} {what}" for c in SIGNERS for what in ("token", "worker socket")} \
        <= set(matrix)
    # The database, honestly: with SQLite every member of its group writes every table, the other domain's key
    # registry rows included (docs/deployment.md: no integrity between domains; PostgreSQL with a role per domain).
    writes = {"database": database_writers(users, d.layout.database)}
    print(f"\nPINs in {'OpenBao' if d.openbao else 'files'}:\n" + format_matrix(matrix, users, writes))

    front, hrss, bank, audit = (d.users.of(c) for c in ("front", "hrss", "bank", "audit"))
    for c in SIGNERS:
        assert not matrix[pin[c]][front] and not matrix[f"{c} token"][front]
    for mine, theirs in ((hrss, "bank"), (bank, "hrss")):
        assert not any(matrix[name][mine] for name in (pin[theirs], f"{theirs} token", f"{theirs} worker socket"))
    assert {name for name, row in matrix.items() if row[audit]} == \
        {pin["audit"], "audit token", "audit worker socket"} | ({"audit AppRole secret_id"} if d.openbao else set())
    # And every cell as the layout means it: each secret readable by its owners and nobody else.
    assert {name: {u for u in users if row[u]} for name, row in matrix.items()} == expected
    assert {u for u, can in writes["database"].items() if can} == {front, hrss, bank}  # hrss can write bank's rows


def test_a_pin_source_replaces_the_pin_file_with_a_reference_and_credentials_of_its_user() -> None:
    """The hook for OpenBao-held PINs: a component's ``PinSource`` puts its reference and ``openbao:`` block into the
    worker configuration, its ``AppRole`` credential files go beside it (0400, its user), the PIN is handed to
    ``store``, and no PIN file is left. Building twice gives the same layout (idempotent), the other components
    keep ``file:pin``."""
    work = Path(tempfile.mkdtemp(prefix="kms-separation-", dir="/tmp"))
    os.chmod(work, 0o755)
    users = ServiceUsers.prefixed(f"kmst{secrets.token_hex(3)}")
    created: list[str] = []
    stored: list[str] = []
    try:
        home = init_home(work / "home", bureaus={"bureau-a": ("station-a1",)})
        home_pin = (home.path / "pins" / "hrss.pin").read_text(encoding="utf-8").strip()
        created = ensure_users(users)
        openbao = AppRole.block("http://127.0.0.1:8200")
        source = PinSource("vault:kv/kms/hrss#pin", openbao, stored.append)
        for _ in range(2):
            layout = separate(home, work / "srv", users, pin_sources={"hrss": source},
                              approles={"hrss": AppRole("role-1", "secret-1")})
        assert stored == [home_pin]  # handed over once; the second run finds it gone and keeps the reference
        assert not layout.pin_file("hrss").exists() and not (home.path / "pins" / "hrss.pin").exists()
        worker = yaml.safe_load(layout.worker_config("hrss").read_text(encoding="utf-8"))
        assert worker["domains"] == {"hrss": {"token": "kms-hrss", "pin": "vault:kv/kms/hrss#pin"}}
        assert worker["openbao"] == openbao
        assert worker["openbao"]["approle"] == {"role_id": "file:openbao/role-id",
                                                "secret_id": "file:openbao/secret-id"}
        hrss = run_as(users.hrss)["user"]
        credentials = layout.approle("hrss")
        assert credentials is not None and layout.approle("bank") is None
        assert [p.read_text(encoding="utf-8") for p in credentials] == ["role-1\n", "secret-1\n"]
        for path in credentials:
            info = path.stat()
            assert (info.st_uid, stat.S_IMODE(info.st_mode)) == (hrss, 0o400)
        bank = yaml.safe_load(layout.worker_config("bank").read_text(encoding="utf-8"))
        assert bank["domains"]["bank"]["pin"] == "file:pin" and "openbao" not in bank
        info = layout.pin_file("bank").stat()
        assert (info.st_uid, stat.S_IMODE(info.st_mode)) == (run_as(users.bank)["user"], 0o400)
        probed = [users.front, users.hrss, users.bank]
        with searchable(probed, [Path(sys.executable), Path(sys.prefix), Path(sys.base_prefix)]):
            readers = readability(probed, {"hrss secret-id": layout.dir("hrss") / "openbao" / "secret-id"})
        assert readers == {"hrss secret-id": {users.front: False, users.hrss: True, users.bank: False}}
    finally:
        remove_users(created)
        shutil.rmtree(work, ignore_errors=True)


def test_an_account_that_is_not_a_service_account_is_refused_not_changed() -> None:
    before = Path("/etc/passwd").read_bytes(), Path("/etc/group").read_bytes()
    with pytest.raises(ConfigError, match="user root exists and is not a system account"):
        ensure_users(ServiceUsers(front="root", hrss="root", bank="root", audit="root", database="root"))
    assert (Path("/etc/passwd").read_bytes(), Path("/etc/group").read_bytes()) == before
