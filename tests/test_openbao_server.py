"""The OpenBao test server (tests/openbao.py) is the real thing: AppRole logins, KV v2 and policies are enforced."""

from __future__ import annotations

import hvac
import hvac.exceptions
import pytest
from openbao import BaoServer

READ_ONE = 'path "kv/data/fixture/one" { capabilities = ["read"] }\n'


def test_an_approle_reads_only_what_its_policy_allows(openbao: BaoServer) -> None:
    openbao.put("fixture/one", pin="1111")
    openbao.put("fixture/two", pin="2222")
    role_id, secret_id = openbao.approle("fixture-reader", READ_ONE)
    client = hvac.Client(url=openbao.address)
    client.auth.approle.login(role_id=role_id, secret_id=secret_id)
    read = client.secrets.kv.v2.read_secret_version(path="fixture/one", mount_point="kv",
                                                    raise_on_deleted_version=True)
    assert read["data"]["data"]["pin"] == "1111"
    with pytest.raises(hvac.exceptions.Forbidden):
        client.secrets.kv.v2.read_secret_version(path="fixture/two", mount_point="kv", raise_on_deleted_version=True)


def test_a_wrapped_secret_id_unwraps_once(openbao: BaoServer) -> None:
    openbao.approle("fixture-wrapped", READ_ONE)
    wrapping = openbao.wrapped_secret_id("fixture-wrapped")
    first = hvac.Client(url=openbao.address, token=wrapping).sys.unwrap()
    assert first["data"]["secret_id"]
    with pytest.raises(hvac.exceptions.InvalidRequest):
        hvac.Client(url=openbao.address, token=wrapping).sys.unwrap()
