"""SM4 transport keys by ceremony (issue 14): register-transport-key with algorithm=SM4, through `kms serve` over
mutual TLS, on a development home on the development SM token. The station makes a single-use unwrap key with
`kms station unwrap-key`, the officers propose (naming its SHA-256), approve and execute, the station takes the key
with `kms station accept-transport-key` (which destroys its unwrap key), and a batch of the SM profile is then
sealed under that new SM4 key and opened by the station with `kms station fetch --open`. Also SM4 transport keys
from and to 16-byte components, and the refusals: SM4 where the token has none, an unwrap key used twice.

The development token is SoftHSM2 with the project's patch (deploy/softhsm2-sm/): it checks kms's PKCS#11 calls
for SM4, not compatibility with any vendor's HSM.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import card, kms, requires_sm_token, service_client

from kms import bundle, config, runtime
from kms.ceremony import components, keyops
from kms.client.ceremony import CeremonyClient
from kms.clock import SystemClock
from kms.dev.ceremonies import client, key, open_batch, run_ceremony
from kms.dev.home import Home, init_home
from kms.errors import InvalidArgument
from kms.hsm.session import TokenSession
from kms.hsm.types import Algorithm, KcvMethod
from kms.identity import Principal
from kms.registry import DOMAINS, KeyKind, KeyRegistry, KeyState
from kms.server.serve import Service

pytestmark = [pytest.mark.hsm, pytest.mark.service]

STATION, BUREAU = "station-b1", "bureau-b"
ALICE = Principal("officer", "alice", domain="hrss")
BOB, CHEN = Principal("officer", "bob", domain="hrss"), Principal("officer", "chen", domain="hrss")


@pytest.fixture(scope="module")
def sm_home(tmp_path_factory: pytest.TempPathFactory) -> Home:
    return init_home(tmp_path_factory.mktemp("sm-transport-home"), card_profiles=("dual-app-sm",))


@pytest.fixture(scope="module")
def sm_service(sm_home: Home) -> Iterator[Service]:
    svc = Service(sm_home.config, listen="127.0.0.1:0")
    yield svc
    svc.stop(grace=0)


def _registry(home: Home) -> KeyRegistry:
    return runtime.registry(config.load(home.config), SystemClock())


def _station(home: Home, service: Service, *args: str) -> dict[str, object]:
    """A `kms station` command as the bureau's operator runs it, its --json output."""
    station_config = str(home.station_config(STATION))
    server = ("--server", f"localhost:{service.port}") if args[0] != "unwrap-key" else ()
    result = kms("station", *args, "--station-config", station_config, *server, "--json", check=True)
    return dict(json.loads(result.stdout))


@requires_sm_token
def test_an_sm4_transport_key_by_ceremony_reaches_the_station_and_serves_the_next_batch(
        sm_home: Home, sm_service: Service, tmp_path: Path) -> None:
    registry = _registry(sm_home)
    handed: dict[str, int] = {}
    for domain in DOMAINS:
        made = _station(sm_home, sm_service, "unwrap-key", "--domain", domain)
        done = run_ceremony(sm_home, sm_service.port, domain, "register-transport-key", {
            "bureau": BUREAU, "method": "rsa-oaep", "station": STATION, "algorithm": "SM4",
            "public_key": made["pem"], "public_key_sha256": made["sha256"]})
        assert done.state == "executed", done.error
        result = json.loads(done.result_json)
        assert result["algorithm"] == "SM4" and result["state"] == "pre-activation"
        assert result["kcv_method"] == KcvMethod.SM4_ECB_ZERO.value
        record = registry.get(domain, KeyKind.TRANSPORT, BUREAU, result["version"])
        assert record.algorithm == "SM4" and record.state is KeyState.PRE_ACTIVATION
        accepted = _station(sm_home, sm_service, "accept-transport-key", "--domain", domain)
        assert accepted["algorithm"] == "SM4" and accepted["kcv"] == result["kcv"] == record.kcv
        assert registry.active(domain, KeyKind.TRANSPORT, BUREAU).version == result["version"]
        handed[domain] = result["version"]
        # the unwrap key is gone: the same public key cannot be named for another hand-off
        with pytest.raises(InvalidArgument, match=r"params\.public_key: has received a transport key already"):
            run_ceremony(sm_home, sm_service.port, domain, "register-transport-key", {
                "bureau": BUREAU, "method": "rsa-oaep", "station": STATION, "algorithm": "SM4",
                "public_key": made["pem"]}, execute=False)

    batch = f"B-{secrets.token_hex(4)}"
    cards = [card(70_000 + i, card_ref=f"smt-{i}") for i in range(3)]
    with client(sm_home, sm_service.port, ALICE) as officer:
        open_batch(sm_home, sm_service.port, officer, batch, BUREAU, "dual-app-sm-v1", cards)
    with service_client(sm_home, sm_service, STATION) as station:
        data = station.issue_card(batch, "smt-0").data
    for section in bundle.parse(data).sections:  # sealed under the SM4 keys the ceremonies just handed over
        assert section.transport_key_version == handed[section.domain]
        assert {k.wrap for k in section.keys} == {"SM4-ECB"}
    opened = _station(sm_home, sm_service, "fetch", "--batch-id", batch, "--out", str(tmp_path / "b"), "--open")
    assert opened["fetched"] == opened["opened"] == 3 and opened["keys"] == opened["kcv_matches"]
    assert opened["keys"]


@requires_sm_token
def test_sm4_transport_keys_from_and_to_components_of_16_bytes(sm_home: Home, sm_service: Service) -> None:
    registry, bureau = _registry(sm_home), f"bureau-{secrets.token_hex(3)}"
    parts = [bytearray(secrets.token_bytes(16)), bytearray(secrets.token_bytes(16))]
    expected = components.kcv(Algorithm.SM4, components.join(parts))
    ceremony = run_ceremony(sm_home, sm_service.port, "hrss", "register-transport-key", {
        "bureau": bureau, "method": "import-components", "algorithm": "SM4", "kcv": expected,
        "custodians": ["bob", "chen"]}, execute=False)
    for who, part in zip((BOB, CHEN), parts, strict=True):
        with client(sm_home, sm_service.port, who) as c:
            CeremonyClient(c).submit_component(ceremony.ceremony_id, part, components.kcv(Algorithm.SM4, part))
    with client(sm_home, sm_service.port, ALICE) as c:
        assert CeremonyClient(c).execute(ceremony.ceremony_id).state == "executed"
    [made] = registry.versions("hrss", KeyKind.TRANSPORT, bureau)
    assert (made.algorithm, made.kcv, made.kcv_method) == ("SM4", expected, KcvMethod.SM4_ECB_ZERO.value)

    other = f"bureau-{secrets.token_hex(3)}"
    done = run_ceremony(sm_home, sm_service.port, "hrss", "register-transport-key", {
        "bureau": other, "method": "export-components", "algorithm": "SM4", "recipients": ["bob", "chen"]})
    assert done.state == "executed", done.error
    opened = []
    for who in (BOB, CHEN):
        with client(sm_home, sm_service.port, who) as c:
            opened.append(CeremonyClient(c).fetch_component(done.ceremony_id, key(sm_home, who), who.uri())[0])
    assert [len(p) for p in opened] == [16, 16]
    record = registry.get("hrss", KeyKind.TRANSPORT, other, 1)
    assert record.algorithm == "SM4" and components.kcv(Algorithm.SM4, components.join(opened)) == record.kcv


# -- where the token has no SM4 (the standard SoftHSM2 of the session's home) ------------------------------------


def test_sm4_is_refused_at_proposal_where_the_mechanism_profile_has_no_sm4(home: Home, service: Service) -> None:
    for method, extra in (("export-components", {"recipients": ["bob", "chen"]}),
                          ("rsa-oaep", {"station": "station-a1", "public_key": _rsa_pem()})):
        with pytest.raises(InvalidArgument, match=r"params\.algorithm: SM4: the hrss domain's mechanism profile"):
            run_ceremony(home, service.port, "hrss", "register-transport-key",
                         {"bureau": "bureau-a", "method": method, "algorithm": "SM4", **extra}, execute=False)
    with pytest.raises(InvalidArgument, match=r"params\.algorithm: must be one of AES256, SM4"):
        run_ceremony(home, service.port, "hrss", "register-transport-key",
                     {"bureau": "bureau-a", "method": "export-components", "algorithm": "DES2",
                      "recipients": ["bob", "chen"]}, execute=False)
    with pytest.raises(InvalidArgument, match=r"params\.public_key_sha256: is not the public key's"):
        run_ceremony(home, service.port, "hrss", "register-transport-key",
                     {"bureau": "bureau-a", "method": "rsa-oaep", "station": "station-a1", "public_key": _rsa_pem(),
                      "public_key_sha256": "00" * 32}, execute=False)


def test_a_worker_whose_token_has_no_sm4_refuses_an_sm4_transport_key_before_making_anything(
        sessions: dict[str, TokenSession], registry: KeyRegistry) -> None:
    """At execution (a worker service's domain, whose profile the front end does not know)."""

    class Worker:
        domain, session = "hrss", sessions["hrss"]

    Worker.registry = registry  # type: ignore[attr-defined]
    bureau = f"bureau-{secrets.token_hex(3)}"
    with pytest.raises(InvalidArgument, match=r"params\.algorithm: SM4: the hrss domain's token does not offer"):
        keyops.transport_key_for_rsa(Worker(), bureau, b"", "SM4")  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument, match=r"params\.algorithm"):
        keyops.create_key(Worker(), "transport", bureau, "SM4", True)  # type: ignore[arg-type]
    assert registry.versions("hrss", KeyKind.TRANSPORT, bureau) == []


def _rsa_pem() -> str:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    public = rsa.generate_private_key(public_exponent=65537, key_size=2048).public_key()
    return public.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()
