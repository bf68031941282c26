"""The import contract of the packages (docs/architecture.md, section 3): which module may import which library,
and which package may import which other kms package. Read from the source with ast, so an import inside a
function counts as much as one at the top.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from helpers import ROOT

KMS = ROOT / "kms"
PACKAGES = {"hsm", "cards", "issuance", "ceremony", "audit", "server", "client", "cli", "dev", "v1", "policies",
            "migrations"}

#: The modules that keep records: the only ones that may import SQLAlchemy.
STORES = {
    "kms.store", "kms.repository", "kms.registry", "kms.principals", "kms.station",
    "kms.audit.log",
    "kms.ceremony.store", "kms.ceremony.officers", "kms.ceremony.handoffs",
    "kms.issuance.batches", "kms.issuance.consents", "kms.issuance.lifecycle", "kms.issuance.limits",
}
#: The schema's revisions (Alembic's environment and versions/): SQLAlchemy and Alembic too.
MIGRATIONS = "kms.migrations"

#: Package -> the other kms packages it may import ("core": the flat modules of kms/). The column "may import" of
#: the package map in docs/architecture.md.
MAY_IMPORT = {
    "core": {"hsm", "audit"},
    "hsm": {"core"},
    "cards": {"core", "hsm"},
    "audit": {"core", "hsm"},
    "issuance": {"core", "hsm", "cards", "audit", "policies"},
    "ceremony": {"core", "hsm", "cards", "audit", "issuance", "policies"},
    "server": {"core", "hsm", "cards", "audit", "issuance", "ceremony", "policies", "v1"},
    "client": {"core", "hsm", "cards", "ceremony", "v1"},
    "cli": {"core", "hsm", "cards", "audit", "issuance", "ceremony", "server", "client", "dev"},
    "dev": {"core", "hsm", "cards", "audit", "issuance", "ceremony", "client", "policies", "v1"},
    "policies": set(),
    "migrations": {"core"},
}


def _modules() -> dict[str, Path]:
    modules = {}
    for path in sorted(KMS.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        if not name.startswith("kms.v1"):
            modules[name] = path
    return modules


def _imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            if node.module == "kms":
                found |= {f"kms.{alias.name}" for alias in node.names}
    return found


def _package(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in PACKAGES else "core"


def _importers(library: str) -> set[str]:
    return {name for name, path in _modules().items()
            if any(i == library or i.startswith(library + ".") for i in _imports(path))}


def test_the_contract_sees_every_module() -> None:
    modules = _modules()
    assert len(modules) > 60 and {"kms.hsm.session", "kms.server.frame", "kms.store", "kms.cli.main"} <= set(modules)
    assert {_package(m) for m in modules} == set(MAY_IMPORT)


def test_pkcs11_only_under_kms_hsm() -> None:
    importers = _importers("pkcs11")
    assert importers and all(m.startswith("kms.hsm.") for m in importers), importers
    # The plain value types stay importable without the PKCS#11 library (the CLI and the clients use them).
    assert "kms.hsm.types" not in importers


def test_grpc_only_in_the_server_and_the_clients() -> None:
    for library in ("grpc", "grpc_health", "grpc_reflection"):
        importers = _importers(library)
        assert all(_package(m) in {"server", "client"} for m in importers), (library, importers)
    assert _importers("grpc")


def _in_migrations(module: str) -> bool:
    return module == MIGRATIONS or module.startswith(MIGRATIONS + ".")


def test_sqlalchemy_only_in_the_stores() -> None:
    importers = {m for m in _importers("sqlalchemy") if not _in_migrations(m)}
    assert importers and importers <= STORES, importers - STORES


def test_alembic_only_in_kms_store_and_the_migrations() -> None:
    importers = _importers("alembic")
    assert "kms.store" in importers and "kms.migrations.env" in importers
    assert all(m == "kms.store" or _in_migrations(m) for m in importers), importers
    # kms.store finds the revisions by their directory; nothing imports the migrations package.
    assert not [name for name, path in _modules().items() if not _in_migrations(name)
                and any(_in_migrations(i) for i in _imports(path))]


def test_packages_import_only_what_the_package_map_allows() -> None:
    wrong = []
    for name, path in _modules().items():
        mine = _package(name)
        for imported in _imports(path):
            if imported.startswith("kms.") or imported == "kms":
                theirs = _package(imported)
                if theirs != mine and theirs not in MAY_IMPORT[mine]:
                    wrong.append(f"{name} imports {imported} ({mine} may import {sorted(MAY_IMPORT[mine])})")
    assert not wrong, "\n".join(wrong)


def test_client_commands_and_hsm_worker_processes_do_not_load_alembic() -> None:
    """Alembic (and Mako) load only where the schema is checked in full or changed: not for `kms --help`, not in
    the client commands' modules, not with kms.store, kms.runtime or the HSM worker processes' module."""
    child = (
        "import contextlib, io, sys\n"
        "import kms.store, kms.runtime, kms.issuance.workers, kms.client.service, kms.cli.main\n"
        "with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):\n"
        "    kms.cli.main.main(['--help'])\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('alembic', 'mako')))\n"
    )
    done = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert done.returncode == 0 and done.stdout == "[]\n", done
