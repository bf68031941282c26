"""A domain's issuance signing key made and rotated under dual control (generate-signing-key, then set-key-state),
end to end: a real `kms serve` over mutual TLS, officers approving with their own keys, the key pair made in the
domain's SoftHSM2 token by its worker, a batch issued with the new key and opened by a station (`kms bundle open`, a
process of its own with its own token) that trusts it — and refused by one that does not yet; bundles signed with
the old key still open while the station trusts both. The same for SM2 on the development SM token (a token that
checks kms's PKCS#11 calls, not vendor compatibility). Each test has a home of its own: rotating the shared test
home's key would change what every other test's station must trust."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from helpers import card, kms, officer, open_batch, requires_sm_token, run_ceremony, service_client

from kms import bundle, config, runtime
from kms.audit.log import AuditLog
from kms.client.ceremony import CeremonyClient
from kms.clock import SystemClock
from kms.dev.ceremonies import client
from kms.dev.home import Home, init_home
from kms.errors import InvalidArgument
from kms.registry import KeyKind, KeyRegistry, KeyState

pytestmark = [pytest.mark.hsm, pytest.mark.service]

STATION, BUREAU = "station-a1", "bureau-a"
ALICE = officer("hrss", 0)


@pytest.fixture(scope="module")
def plain_home(tmp_path_factory: pytest.TempPathFactory) -> Home:
    return init_home(tmp_path_factory.mktemp("signing-home"))


@pytest.fixture(scope="module")
def plain_service(plain_home: Home) -> Iterator[object]:
    from kms.server.serve import Service

    svc = Service(plain_home.config, listen="127.0.0.1:0")
    yield svc
    svc.stop(grace=0)


def _registry(home: Home) -> KeyRegistry:
    return runtime.registry(config.load(home.config), SystemClock())


def _issue(home: Home, service: object, profile: str, batch: str, count: int, out: Path) -> list[Path]:
    """A batch opened by both domains' authorizations and streamed by the station; its bundles as files."""
    port = service.port  # type: ignore[attr-defined]
    cards = [card(i, card_ref=f"{batch.lower()}-{i:03d}") for i in range(count)]
    with service_client(home, service, ALICE) as creator:  # type: ignore[arg-type]
        open_batch(home, port, creator, batch, BUREAU, profile, cards)
    with service_client(home, service, STATION) as station:  # type: ignore[arg-type]
        received = list(station.stream_batch(batch, per_message=4))
    out.mkdir(parents=True, exist_ok=True)
    files = []
    for got in received:
        files.append(out / f"{got.card_ref}.kmsb")
        files[-1].write_bytes(got.data)
    return files


def _station_opens(home: Home, files: list[Path]) -> subprocess.CompletedProcess[str]:
    """`kms bundle open --verify-only` at the station: its own process, its own token and trust store."""
    return kms("bundle", "open", "--station-config", str(home.station_config(STATION)), "--verify-only", "--json",
               *map(str, files))


def _key_ids(files: list[Path], domain: str) -> set[str]:
    return {s.key_id for f in files for s in bundle.parse(f.read_bytes()).sections if s.domain == domain}


def _token_objects(home: Home, domain: str, label: str) -> list[dict[str, object]]:
    """The token's own description of the objects labelled ``label`` (in a process of its own: the PKCS#11 module is
    initialized once per process, with the SoftHSM2 configuration of the first home that loaded it)."""
    script = (
        "import json, sys\n"
        "from pathlib import Path\n"
        "from kms import config, runtime\n"
        "cfg = config.load(Path(sys.argv[1]))\n"
        "with runtime.open_domain(cfg, sys.argv[2]) as s:\n"
        "    print(json.dumps([{'class': o.object_class, 'sensitive': o.sensitive, 'extractable': o.extractable,\n"
        "                       'never_extractable': o.never_extractable, 'capabilities': sorted(o.capabilities)}\n"
        "                      for o in s.objects() if o.label == sys.argv[3]]))\n")
    result = subprocess.run([sys.executable, "-c", script, str(home.config), domain, label], capture_output=True,
                            text=True, check=True, timeout=120)
    found: list[dict[str, object]] = json.loads(result.stdout)
    return found


def _rotate(home: Home, service: object, domain: str, name: str, params: dict[str, str], profile: str,
            tmp_path: Path) -> None:
    """Issue with the current key; generate the next version; activate it; issue again. Checks the station's
    verdicts without and with the new public key in its trust store, and the old bundles throughout."""
    port = service.port  # type: ignore[attr-defined]
    registry = _registry(home)
    old = registry.active(domain, KeyKind.SIGNING, name)
    before = _issue(home, service, profile, f"B-{domain}-before", 2, tmp_path / "before")
    assert _station_opens(home, before).returncode == 0

    made = run_ceremony(home, port, domain, "generate-signing-key", params)
    assert made.state == "executed", made.error
    result = json.loads(made.result_json)
    version = old.version + 1
    assert (result["label"], result["version"], result["state"]) == (
        f"kms/{domain}/signing/{name}/v{version}", version, "pre-activation")
    record = registry.get(domain, KeyKind.SIGNING, name, version)
    assert record.state is KeyState.PRE_ACTIVATION and record.algorithm == old.algorithm
    assert record.public_key is not None
    assert result["public_key"] == _pem(record.public_key)
    assert result["spki_sha256"] == hashlib.sha256(record.public_key).hexdigest()
    assert result["key_id"] == bundle.key_id(record.public_key)
    assert result["trust_file"] == f"{domain}-{name}-v{version}.pem"
    # The private half: sensitive, never extractable, for signing only; the public half verifies.
    objects = {o["class"]: o for o in _token_objects(home, domain, record.label)}
    assert set(objects) == {"PRIVATE_KEY", "PUBLIC_KEY"}
    private = objects["PRIVATE_KEY"]
    assert (private["sensitive"], private["extractable"], private["never_extractable"]) == (True, False, True)
    assert "SIGN" in private["capabilities"] and not {"DECRYPT", "DERIVE", "UNWRAP"} & set(
        private["capabilities"])  # type: ignore[arg-type]
    # The minutes carry the public key for the bureaus.
    with client(home, port, officer(domain, 0)) as c:
        minutes = CeremonyClient(c).minutes(made.ceremony_id)
    assert result["public_key"] in json.loads(minutes.document)["result"]["public_key"]

    # Not yet active: new batches are still signed with the old key.
    pending = _issue(home, service, profile, f"B-{domain}-pending", 1, tmp_path / "pending")
    assert _key_ids(pending, domain) == {bundle.key_id(old.public_key or b"")}

    activated = run_ceremony(home, port, domain, "set-key-state",
                             {"kind": "signing", "name": name, "version": version, "state": "active"})
    assert activated.state == "executed", activated.error
    assert registry.active(domain, KeyKind.SIGNING, name).version == version
    after = _issue(home, service, profile, f"B-{domain}-after", 2, tmp_path / "after")
    assert _key_ids(after, domain) == {result["key_id"]}
    refused = _station_opens(home, after)  # the station does not trust the new key yet
    assert refused.returncode == 7 and json.loads(refused.stdout)["rejected"] == len(after)

    # The bureau adds the published key to its station's trust store: both keys' bundles open.
    (home.path / "trust" / result["trust_file"]).write_text(result["public_key"])
    assert _station_opens(home, after).returncode == 0
    assert _station_opens(home, before).returncode == 0

    # The old version retired: new batches keep the new key, and the old bundles still open at the station.
    retired = run_ceremony(home, port, domain, "set-key-state",
                           {"kind": "signing", "name": name, "version": old.version, "state": "deactivated"})
    assert retired.state == "executed", retired.error
    later = _issue(home, service, profile, f"B-{domain}-later", 1, tmp_path / "later")
    assert _key_ids(later, domain) == {result["key_id"]}
    assert _station_opens(home, later + before).returncode == 0

    # Each step is audited, with the public key as its fingerprint only.
    records = [json.loads(r.body) for r in AuditLog(_engine(home), SystemClock()).records()]
    mine = [r for r in records if r.get("subject") == record.label]
    assert [r["kind"] for r in mine] == ["key.added", "key.kcv", "key.state"]
    assert mine[0]["detail"]["state"] == "pre-activation"
    assert mine[1]["detail"]["public_key_sha256"] == result["spki_sha256"]
    assert (mine[2]["detail"]["from"], mine[2]["detail"]["to"]) == ("pre-activation", "active")
    executed = next(r for r in records if r["kind"] == "ceremony.executed" and r["subject"] == made.ceremony_id)
    assert executed["detail"]["result"]["spki_sha256"] == result["spki_sha256"]
    assert "BEGIN PUBLIC KEY" not in json.dumps(records)


def _pem(spki: bytes) -> str:
    from kms.station import spki_pem

    return spki_pem(spki).decode("ascii")


def _engine(home: Home) -> object:
    from kms import store

    return store.make_engine(config.load(home.config).database)


def test_an_ecdsa_signing_key_is_made_activated_and_trusted_by_ceremonies(
        plain_home: Home, plain_service: object, tmp_path: Path) -> None:
    _rotate(plain_home, plain_service, "hrss", "issuance", {"name": "issuance"}, "dual-app-v1", tmp_path)
    record = _registry(plain_home).active("hrss", KeyKind.SIGNING, "issuance")
    public = serialization.load_der_public_key(record.public_key or b"")
    assert isinstance(public, ec.EllipticCurvePublicKey) and public.curve.name == "secp256r1"
    # The domain's ceremony minutes are signed with the new version now.
    done = run_ceremony(plain_home, plain_service.port, "hrss", "set-limits",  # type: ignore[attr-defined]
                        {"scope": "bureau", "subject": BUREAU, "cards_per_hour": 1000})
    with client(plain_home, plain_service.port, ALICE) as c:  # type: ignore[attr-defined]
        assert CeremonyClient(c).minutes(done.ceremony_id).signing_key == record.label


def test_generate_signing_key_proposals_are_checked_naming_the_field(plain_home: Home, plain_service: object
                                                                      ) -> None:
    port = plain_service.port  # type: ignore[attr-defined]
    cases = [
        ({"name": "mine"}, "params.name"),
        ({"name": "issuance", "algorithm": "rsa"}, "params.algorithm"),
        ({"name": "issuance", "algorithm": "sm2"}, "params.algorithm"),  # issuance keys are ECDSA P-256
        ({"name": "issuance", "colour": "red"}, "params.colour"),
        ({"algorithm": "ecdsa-p256"}, "params.name"),
        # The standard SoftHSM2 token and mechanism profile have no SM2: refused when proposed, not when run.
        ({"name": "issuance-sm2"}, "params.algorithm"),
        ({"name": "issuance-sm2", "algorithm": "sm2"}, "params.algorithm"),
    ]
    with client(plain_home, port, officer("bank", 0)) as c:
        carol = CeremonyClient(c)
        for params, field in cases:
            with pytest.raises(InvalidArgument) as caught:
                carol.propose("generate-signing-key", params)
            assert caught.value.field == field, (params, caught.value)
        with pytest.raises(InvalidArgument, match="token does not offer sm2"):
            carol.propose("generate-signing-key", {"name": "issuance-sm2"})
    # The command line: one line on stderr naming the field, exit status 2; a good proposal is open.
    cli = ("ceremony", "propose", "--client", str(plain_home.client_config(officer("bank", 0))), "--server",
           f"localhost:{port}")
    bad = kms(*cli, "generate-signing-key", "name=issuance-sm2", "algorithm=sm2")
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "params.algorithm" in bad.stderr, bad.stderr
    good = json.loads(kms(*cli, "generate-signing-key", "name=issuance", "--json", check=True).stdout)
    assert (good["operation"], good["params"], good["state"]) == (
        "generate-signing-key", {"name": "issuance", "algorithm": "ecdsa-p256"}, "open")
    with client(plain_home, port, officer("bank", 0)) as c:
        CeremonyClient(c).cancel(good["ceremony_id"])


def test_a_version_awaiting_activation_blocks_the_next_and_can_be_destroyed(plain_home: Home, plain_service: object
                                                                            ) -> None:
    port = plain_service.port  # type: ignore[attr-defined]
    registry = _registry(plain_home)
    made = run_ceremony(plain_home, port, "bank", "generate-signing-key", {"name": "issuance"})
    version = json.loads(made.result_json)["version"]
    label = f"kms/bank/signing/issuance/v{version}"
    with client(plain_home, port, officer("bank", 0)) as c, pytest.raises(
            InvalidArgument, match=f"{label} awaits activation") as caught:
        CeremonyClient(c).propose("generate-signing-key", {"name": "issuance"})
    assert caught.value.field == "params.name"
    destroyed = run_ceremony(plain_home, port, "bank", "destroy-key",
                             {"kind": "signing", "name": "issuance", "version": version})
    assert destroyed.state == "executed", destroyed.error
    assert registry.get("bank", KeyKind.SIGNING, "issuance", version).state is KeyState.DESTROYED
    assert _token_objects(plain_home, "bank", label) == []  # both halves gone from the token
    assert registry.active("bank", KeyKind.SIGNING, "issuance").version == version - 1  # still signing
    again = run_ceremony(plain_home, port, "bank", "generate-signing-key", {"name": "issuance"})
    assert json.loads(again.result_json)["version"] == version + 1


def test_the_only_active_version_of_a_signing_key_is_not_suspended_or_deactivated(
        plain_home: Home, plain_service: object) -> None:
    port = plain_service.port  # type: ignore[attr-defined]
    registry = _registry(plain_home)

    def versions(state: KeyState) -> list[int]:
        return [r.version for r in registry.versions("bank", KeyKind.SIGNING, "issuance") if r.state is state]

    (only,) = versions(KeyState.ACTIVE)
    pending = versions(KeyState.PRE_ACTIVATION)
    if not pending:  # the next version, made and awaiting activation
        made = run_ceremony(plain_home, port, "bank", "generate-signing-key", {"name": "issuance"})
        pending = [json.loads(made.result_json)["version"]]
    retire = {"kind": "signing", "name": "issuance", "version": only, "state": "deactivated"}
    # Proposed while the next version awaits activation: accepted; executed before it is active: refused.
    early = run_ceremony(plain_home, port, "bank", "set-key-state", retire, execute=False)
    with client(plain_home, port, officer("bank", 0)) as c:
        with pytest.raises(InvalidArgument, match="only active version of the bank issuance signing key") as caught:
            CeremonyClient(c).execute(early.ceremony_id)
        assert caught.value.field == "params.state"
        compromised = CeremonyClient(c).propose("set-key-state", {**retire, "state": "compromised"})
        assert compromised.state == "open"  # a compromised key can always be stopped
        CeremonyClient(c).cancel(compromised.ceremony_id)
    assert versions(KeyState.ACTIVE) == [only]
    activated = run_ceremony(plain_home, port, "bank", "set-key-state",
                             {"kind": "signing", "name": "issuance", "version": pending[0], "state": "active"})
    assert activated.state == "executed", activated.error
    assert versions(KeyState.ACTIVE) == [only, pending[0]]
    # Both retirements are accepted while two versions are active; the second to run is refused when it runs.
    first, second = (run_ceremony(plain_home, port, "bank", "set-key-state", {**retire, "version": v},
                                  execute=False) for v in (only, pending[0]))
    with client(plain_home, port, officer("bank", 0)) as c:
        assert CeremonyClient(c).execute(first.ceremony_id).state == "executed"
        with pytest.raises(InvalidArgument, match="only active version") as caught:
            CeremonyClient(c).execute(second.ceremony_id)
        assert caught.value.field == "params.state"
    assert versions(KeyState.ACTIVE) == [pending[0]]
    with client(plain_home, port, officer("bank", 0)) as c, pytest.raises(
            InvalidArgument, match="only active version") as caught:  # and now it is the only one, none pending
        CeremonyClient(c).propose("set-key-state", {**retire, "version": pending[0], "state": "suspended"})
    assert caught.value.field == "params.state"


# -- SM2 on the development SM token ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sm_home(tmp_path_factory: pytest.TempPathFactory) -> Home:
    return init_home(tmp_path_factory.mktemp("signing-sm-home"), card_profiles=("dual-app-sm",))


@pytest.fixture(scope="module")
def sm_service(sm_home: Home) -> Iterator[object]:
    from kms.server.serve import Service

    svc = Service(sm_home.config, listen="127.0.0.1:0")
    yield svc
    svc.stop(grace=0)


@requires_sm_token
def test_an_sm2_signing_key_is_made_activated_and_trusted_by_ceremonies(
        sm_home: Home, sm_service: object, tmp_path: Path) -> None:
    _rotate(sm_home, sm_service, "bank", "issuance-sm2", {"name": "issuance-sm2", "algorithm": "sm2"},
            "dual-app-sm-v1", tmp_path)
    record = _registry(sm_home).active("bank", KeyKind.SIGNING, "issuance-sm2")
    assert record.algorithm == "SM2" and record.version == 2
