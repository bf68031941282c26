"""The channel over the service's endpoints (kms.client.service.target): one endpoint exactly as before (its
host:port, gRPC's own resolution and policy); several resolved here into one ``ipv4:``/``ipv6:`` list balanced by
round_robin, the TLS name the first endpoint's host; malformed lists refused with one line."""

from __future__ import annotations

import argparse
import socket
from collections.abc import Callable
from pathlib import Path

import pytest

from kms import config
from kms.cli.common import server_option
from kms.client.service import Target, check_server_certificates, server_endpoints, target
from kms.config import Endpoint, TlsConfig
from kms.errors import ConfigError, Unavailable

V4, V6 = socket.AF_INET, socket.AF_INET6


Resolve = Callable[[Endpoint], list[tuple[int, str]]]


def _resolver(table: dict[str, list[tuple[int, str]]]) -> Resolve:
    def resolve(endpoint: Endpoint) -> list[tuple[int, str]]:
        return table.get(endpoint.host, [])
    return resolve


def _endpoints(text: str) -> tuple[Endpoint, ...]:
    return config.endpoints(text)


def test_one_endpoint_is_the_channel_target_as_given_with_no_options() -> None:
    def never(endpoint: Endpoint) -> list[tuple[int, str]]:
        raise AssertionError("one endpoint is resolved by gRPC, not here")

    assert target(_endpoints("kms.example:7443"), never) == Target(
        "kms.example:7443", "kms.example", (("kms.example", 7443),))
    assert target(_endpoints("[::1]:7443"), never).target == "[::1]:7443"


def test_several_endpoints_are_one_round_robin_list_checked_against_the_first_host() -> None:
    resolve = _resolver({"localhost": [(V4, "127.0.0.1"), (V6, "::1")]})
    made = target(_endpoints("localhost:7443,localhost:7444"), resolve)
    assert made.target == "ipv4:127.0.0.1:7443,127.0.0.1:7444"
    assert made.addresses == (("127.0.0.1", 7443), ("127.0.0.1", 7444))
    assert dict(made.options) == {"grpc.lb_policy_name": "round_robin", "grpc.ssl_target_name_override": "localhost",
                                  "grpc.default_authority": "localhost:7443"}


def test_every_address_of_every_host_is_listed_once() -> None:
    resolve = _resolver({"kms-1.example": [(V4, "10.0.0.1"), (V4, "10.0.0.2")],
                         "kms-2.example": [(V4, "10.0.0.2"), (V4, "10.0.0.3")]})
    made = target(_endpoints("kms-1.example:7443,kms-2.example:7443"), resolve)
    assert made.target == "ipv4:10.0.0.1:7443,10.0.0.2:7443,10.0.0.3:7443"
    assert made.name == "kms-1.example"


def test_one_address_family_ipv6_with_ipv4_mapped_unless_ipv4_reaches_every_endpoint() -> None:
    resolve = _resolver({"a": [(V6, "fd00::1")], "b": [(V6, "fd00::2"), (V4, "10.0.0.2")], "c": [(V6, "fd00::3")]})
    made = target(_endpoints("a:1,b:2,c:3"), resolve)
    assert made.target == "ipv6:[fd00::1]:1,[fd00::2]:2,[::ffff:10.0.0.2]:2,[fd00::3]:3"
    assert dict(made.options)["grpc.ssl_target_name_override"] == "a"
    # an endpoint with only IPv4 addresses among IPv6 ones is listed IPv4-mapped, not left out
    resolve = _resolver({"v6": [(V6, "fd00::1")], "v4": [(V4, "10.0.0.2"), (V4, "10.0.0.3")]})
    assert target(_endpoints("v6:1,v4:2"), resolve).target == "ipv6:[fd00::1]:1,[::ffff:10.0.0.2]:2,[::ffff:10.0.0.3]:2"
    assert target(_endpoints("v4:2,v6:1"), resolve).addresses == (
        ("::ffff:10.0.0.2", 2), ("::ffff:10.0.0.3", 2), ("fd00::1", 1))
    # every endpoint has an IPv4 address: IPv4 only, as before
    resolve = _resolver({"a": [(V6, "fd00::1"), (V4, "10.0.0.1")], "b": [(V4, "10.0.0.2")]})
    assert target(_endpoints("a:1,b:2"), resolve).target == "ipv4:10.0.0.1:1,10.0.0.2:2"


def test_ipv4_and_ipv6_literals_mixed_are_all_listed() -> None:
    made = target(_endpoints("[::1]:7443,127.0.0.1:7444"))
    assert made.target == "ipv6:[::1]:7443,[::ffff:127.0.0.1]:7444"
    assert made.name == "::1"


def test_with_a_crl_one_endpoint_is_resolved_here_like_several() -> None:
    """gRPC must not resolve the name again and reach an address whose certificate was not checked: every address
    of the one host is listed (each checked by check_server_certificates), the TLS name still the host."""
    resolve = _resolver({"kms.example": [(V4, "10.0.0.1"), (V4, "10.0.0.2")]})
    made = target(_endpoints("kms.example:7443"), resolve, crl=True)
    assert made.target == "ipv4:10.0.0.1:7443,10.0.0.2:7443"
    assert made.addresses == (("10.0.0.1", 7443), ("10.0.0.2", 7443))
    assert dict(made.options) == {"grpc.lb_policy_name": "round_robin",
                                  "grpc.ssl_target_name_override": "kms.example",
                                  "grpc.default_authority": "kms.example:7443"}
    with pytest.raises(Unavailable, match=r"none of the hosts of gone\.example:7443 resolves to an address$"):
        target(_endpoints("gone.example:7443"), resolve, crl=True)
    # without a CRL one endpoint stays gRPC's to resolve, exactly as before
    assert target(_endpoints("kms.example:7443"), resolve) == Target(
        "kms.example:7443", "kms.example", (("kms.example", 7443),))


def test_a_host_that_does_not_resolve_is_left_out_and_none_resolving_is_unavailable() -> None:
    resolve = _resolver({"kms-2.example": [(V4, "10.0.0.2")]})
    made = target(_endpoints("kms-1.example:7443,kms-2.example:7443"), resolve)
    assert made.target == "ipv4:10.0.0.2:7443"
    assert made.name == "kms-1.example"  # still the name every replica's certificate carries
    with pytest.raises(Unavailable) as nothing:
        target(_endpoints("kms-1.example:7443,kms-3.example:7443"), resolve)
    assert nothing.value.retryable  # retried like the service being down (DNS may come back)
    assert str(nothing.value) == ("service: unavailable: none of the hosts of kms-1.example:7443,kms-3.example:7443 "
                                  "resolves to an address")


def test_the_real_resolver_finds_loopback() -> None:
    made = target(_endpoints("127.0.0.1:7443,localhost:7444"))
    assert made.target == "ipv4:127.0.0.1:7443,127.0.0.1:7444"


def test_without_a_crl_nothing_is_checked_and_the_target_stays() -> None:
    tls = TlsConfig(cert=Path("c.pem"), key=Path("k.pem"), ca=Path("ca.pem"))
    made = Target("ipv4:127.0.0.1:1,127.0.0.1:2", "localhost", (("127.0.0.1", 1), ("127.0.0.1", 2)),
                  (("grpc.lb_policy_name", "round_robin"), ("grpc.ssl_target_name_override", "localhost"),
                   ("grpc.default_authority", "localhost:1")))
    assert check_server_certificates(tls, made, 1.0) is made
    assert made.only([("127.0.0.1", 2)]).target == "ipv4:127.0.0.1:2"


@pytest.mark.parametrize(("server", "message"), [
    ("a:1,", "server: an empty endpoint (two commas in a row, or one at an end)"),
    (["a:1", "a:1"], "server: a:1 is listed twice"),
    ("a", "server: 'a' has no port (host:port)"),
])
def test_a_malformed_server_argument_is_a_config_error(server: str | list[str], message: str) -> None:
    with pytest.raises(ConfigError) as refused:
        server_endpoints(server)
    assert str(refused.value) == message
    assert server_endpoints(["a:1", "b:2"]) == (Endpoint("a", 1), Endpoint("b", 2))


def test_the_server_option_and_its_environment_variable_take_a_list(monkeypatch: pytest.MonkeyPatch,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    def parse(*argv: str) -> argparse.Namespace:
        parser = argparse.ArgumentParser(prog="kms batch show")
        server_option(parser)
        return parser.parse_args(argv)

    monkeypatch.delenv("KMS_SERVER", raising=False)
    assert parse("--server", "localhost:7443, localhost:7444").server == "localhost:7443,localhost:7444"
    assert parse().server is None
    monkeypatch.setenv("KMS_SERVER", "kms-1.example:7443,kms-2.example:7443")
    assert parse().server == "kms-1.example:7443,kms-2.example:7443"
    assert parse("--server", "kms.example:7443").server == "kms.example:7443"  # the flag wins
    monkeypatch.setenv("KMS_SERVER", "kms-1.example:7443,,kms-2.example:7443")
    with pytest.raises(SystemExit) as exited:
        parse()
    assert exited.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        "kms batch show: error: argument --server: an empty endpoint (two commas in a row, or one at an end) "
        "(from $KMS_SERVER)")
