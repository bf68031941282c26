"""Files at rest (kms.files): under umask 022, everything kms creates is 0600 and every directory 0700.

A fresh home made under umask 022, a real ``kms serve`` issuing a batch, and the commands that write files (dev
cards, bundle seal, station fetch --out --open, ceremony minutes -o, audit export, dev revoke-certificate), each in
a process of its own started with umask 022. The commands run with the command line's own umask setting switched
off, so what is checked is that each code path creates its files with explicit modes (kms.files); the umask
setting, the second layer, is checked on its own.
"""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from grpc_health.v1 import health_pb2, health_pb2_grpc
from helpers import ROOT, kms

from kms import config, files, store
from kms.cli import main as cli
from kms.cli.common import read_cards
from kms.client.service import Client
from kms.dev.ceremonies import authorize_batch, client, officer
from kms.dev.home import Home, init_home
from kms.errors import InvalidArgument, PermissionDenied
from kms.identity import Principal

#: ``kms`` with only the explicit modes acting: the umask calls of the command line and of serve do nothing.
EXPLICIT_ONLY = ("import sys; from kms.cli import main as cli; from kms.server import serve; "
                 "cli.restrict_umask = serve.restrict_umask = lambda: 0; "
                 "sys.exit(cli.main(sys.argv[1:]))")


def _umask_022(*command: str) -> list[str]:
    """``command`` run with umask 022. Through a shell rather than ``preexec_fn``: a ``preexec_fn`` makes Python
    fork() this process, which runs gRPC's fork handlers; they restart gRPC's poller in the child, which then dies
    (SIGABRT, "epoll_wait error: Bad file descriptor") when the child closes its descriptors before exec."""
    return ["sh", "-c", 'umask 022 && exec "$@"', "sh", *command]


def kms_022(*args: str) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(_umask_022(sys.executable, "-c", EXPLICIT_ONLY, *args), capture_output=True, text=True,
                            timeout=300, cwd=ROOT, env=dict(os.environ))
    assert result.returncode == 0, result.stderr
    return result


def _open_to_others(*roots: Path) -> list[str]:
    """Every path under ``roots`` (the roots included) that group or others may read, write or enter."""
    found = []
    for root in roots:
        for path in [root, *root.rglob("*")]:
            mode = path.lstat().st_mode
            if stat.S_ISLNK(mode):
                continue
            if mode & 0o077:
                found.append(f"{stat.filemode(mode)} {path}")
    return found


@pytest.fixture(scope="module")
def private_home(tmp_path_factory: pytest.TempPathFactory) -> Home:
    """A development home made in this process under umask 022 (its setup processes inherit it)."""
    old = os.umask(0o022)
    try:
        return init_home(tmp_path_factory.mktemp("files") / "home")
    finally:
        os.umask(old)


@pytest.fixture(scope="module")
def port(private_home: Home) -> Iterator[int]:
    """``kms serve`` of that home in a process of its own, started with umask 022."""
    server = subprocess.Popen(_umask_022(sys.executable, "-c", EXPLICIT_ONLY, "serve", "--config",
                                         str(private_home.config), "--listen", "127.0.0.1:0"),
                              stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        assert server.stdout is not None
        line = server.stdout.readline()
        assert line.startswith("kms: serving on port "), line
        yield int(line.rsplit(" ", 1)[1])
    finally:
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=60) == 0


def test_everything_kms_creates_is_private_under_umask_022(private_home: Home, port: int, tmp_path: Path) -> None:
    home, address = private_home, f"localhost:{port}"
    out = tmp_path / "out"  # made by kms, as the first command's --out needs it
    cards = out / "cards" / "cards.csv"
    kms_022("dev", "cards", "--count", "6", "--out", str(cards))
    kms_022("bundle", "seal", "--config", str(home.config), "--bureau", "bureau-a", "--batch", "S-1",
            "--cards", str(cards), "--out", str(out / "sealed"))
    with client(home, port, officer("bank", 0)) as carol:
        carol.create_batch("B-files", "bureau-a", "dual-app-v1", read_cards(cards))
    ceremony = authorize_batch(home, port, "B-files")[0]
    kms_022("station", "fetch", "--station-config", str(home.station_config("station-a1")), "--server", address,
            "--batch-id", "B-files", "--out", str(out / "fetched" / "bundles"), "--open")
    kms_022("ceremony", "minutes", "--client", str(home.client_config(officer("hrss", 1))), "--server", address,
            ceremony.ceremony_id, "-o", str(out / "minutes" / "authorize-batch.json"))
    kms_022("audit", "export", "--client", str(home.client_config(Principal("auditor", "erin"))), "--server",
            address, "--out", str(out / "audit.jsonl"))
    kms_022("dev", "revoke-certificate", "--home", str(home.path),
            str(home.path / "pki" / "clients" / "station-bureau-b-station-b1.pem"))

    written = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    assert {"cards/cards.csv", "sealed/card-0000000.kmsb", "fetched/bundles/card-0000005.kmsb",
            "minutes/authorize-batch.json", "minutes/authorize-batch.json.sig", "audit.jsonl"} <= written, written
    assert not [name for name in written if name.endswith(".tmp")]
    made = {p.relative_to(home.path).as_posix() for p in home.path.rglob("*")}
    assert {"kms.db", "pins/hrss.pin", "pki/ca.key", "pki/crl.pem", "hsm/softhsm2.conf", "profiles/dual-app.yaml",
            "trust/hrss-issuance-v1.pem", "audit/audit-v1.pem", "stations/station-a1/ledger.db",
            "clients/officer-hrss-alice.approval-key.pem"} <= made
    offending = _open_to_others(home.path, out)
    assert not offending, "open to group or others:\n" + "\n".join(offending)


def test_the_command_line_sets_umask_077(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        assert cli.main(["dev", "cards", "--count", "1", "--out", str(tmp_path / "cards.csv")]) == 0
        assert os.umask(0o022) == files.UMASK  # kms.cli.main.main set it
    finally:
        os.umask(old)
    served = subprocess.run(_umask_022(sys.executable, "-c", "import os; from kms import files; "
                                       "files.restrict_umask(); os.mkdir('d'); open('f', 'w').close()"),
                            cwd=tmp_path, check=True)
    assert served.returncode == 0
    assert [stat.S_IMODE((tmp_path / n).stat().st_mode) for n in ("d", "f")] == [0o700, 0o600]


def test_file_helpers_set_modes_whatever_the_umask(tmp_path: Path) -> None:
    old = os.umask(0o277)  # would even leave the owner unable to write
    try:
        target = tmp_path / "a" / "b" / "file"
        files.write_private(target, "one")
        files.write_private(target, b"two")  # replaced, not appended
        with files.open_private(tmp_path / "a" / "c" / "other", "w") as f:
            f.write("x")
        existing = tmp_path / "loose"
        existing.write_text("y")
        os.chmod(existing, 0o666)
        with files.open_private(existing, "w") as f:  # a file that existed is truncated and made private
            f.write("z")
        with pytest.raises(FileExistsError), files.open_private(existing, "w", exclusive=True):
            pass
        db = tmp_path / "a" / "kms.db"
        engine = store.make_engine(f"sqlite:///{db}")
        store.upgrade(engine)
        with engine.connect() as conn:  # WAL mode: the -wal and -shm files exist while connected
            conn.execute(sa.select(store.keys)).all()
            sidecars = [p for p in (db.with_name("kms.db-wal"), db.with_name("kms.db-shm")) if p.exists()]
            modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in [db, *sidecars]}
        engine.dispose()
        with files.open_private(Path("/dev/null"), "w") as f:  # a device is written, never chmod-ed
            f.write("nothing")
    finally:
        os.umask(old)
    assert target.read_text() == "two" and (tmp_path / "a" / "c" / "other").read_text() == "x"
    assert existing.read_text() == "z" and stat.S_IMODE(existing.stat().st_mode) == 0o600
    assert sidecars and set(modes.values()) == {0o600}, modes
    assert stat.S_IMODE(Path("/dev/null").stat().st_mode) == 0o666
    for path in (tmp_path / "a", tmp_path / "a" / "b", tmp_path / "a" / "c"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o700, path
    for path in (target, tmp_path / "a" / "c" / "other"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    assert sorted(p.name for p in (tmp_path / "a" / "b").iterdir()) == ["file"]  # no temporary file left


def test_a_planted_symbolic_link_is_not_written_through(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_text("keep me")
    os.chmod(victim, 0o644)
    link = tmp_path / "shared" / "cards.csv"
    link.parent.mkdir()
    link.symlink_to(victim)
    with pytest.raises(InvalidArgument) as refused, files.open_private(link, "w"):
        pass
    assert str(refused.value) == (f"{link}: is a symbolic link; kms does not write through one (remove it or choose "
                                  "another path)")
    with pytest.raises(FileExistsError), files.open_private(link, "wb", exclusive=True):
        pass
    device = tmp_path / "shared" / "out.kmsb"
    device.symlink_to("/dev/null")
    with pytest.raises(InvalidArgument, match="is a symbolic link"):
        files.write_private(device, b"data")  # not a regular file: written in place, but not through the link
    assert victim.read_text() == "keep me" and stat.S_IMODE(victim.stat().st_mode) == 0o644
    assert link.is_symlink() and device.is_symlink()

    # The command line: one line, exit 2, nothing written where the link points.
    result = kms("dev", "cards", "--count", "3", "--out", str(link))
    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr == (f"kms: error: {link}: is a symbolic link; kms does not write through one (remove it "
                             "or choose another path)\n")
    assert victim.read_text() == "keep me" and link.is_symlink()


def test_a_certificate_revoked_with_the_command_line_is_refused_by_the_running_server(
        private_home: Home, port: int) -> None:
    """kms serve, started before, refuses station-b1 on its next call after kms dev revoke-certificate (which the
    first test ran too: revoking again changes nothing), and records the refusal."""
    kms_022("dev", "revoke-certificate", "--home", str(private_home.path),
            str(private_home.path / "pki" / "clients" / "station-bureau-b-station-b1.pem"))
    cfg = config.load_station(private_home.station_config("station-b1")).client
    assert cfg is not None
    ok = config.load_station(private_home.station_config("station-a1")).client
    assert ok is not None
    with Client(ok, server=f"localhost:{port}") as a1:
        assert a1.call(health_pb2_grpc.HealthStub(a1.channel).Check, health_pb2.HealthCheckRequest()).status == 1
    with Client(cfg, server=f"localhost:{port}") as b1, pytest.raises(PermissionDenied) as refused:
        b1.call(health_pb2_grpc.HealthStub(b1.channel).Check, health_pb2.HealthCheckRequest())
    assert "the client certificate of station bureau-b/station-b1" in str(refused.value)
    assert str(refused.value).endswith("is revoked")
    engine = store.make_engine(config.load(private_home.config).database)
    with engine.connect() as conn:
        kinds = conn.execute(sa.select(store.audit_log.c.body).where(store.audit_log.c.kind == "request.refused")
                             ).scalars().all()
    engine.dispose()
    assert any("station-b1" in body and "is revoked" in body for body in kinds)
