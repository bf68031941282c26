"""Canaries: no PIN, master key, transport key or clear card key in output, logs, errors or bundles."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import MASTER_KEYS, PROFILE, ROOT, TEST_TRANSPORT_KEYS, VECTORS_PATH, card, seal

from kms import config
from kms.dev.home import Home
from kms.errors import BundleRejected, ConfigError
from kms.station import Station


def _secrets(home: Home) -> list[str]:
    values = [p.read_text().strip() for p in (home.path / "pins").iterdir()]
    for key in (*MASTER_KEYS.values(), *TEST_TRANSPORT_KEYS.values()):
        values += [key.hex().upper(), key.hex()]
    return values


def _assert_clean(text: str, secrets: list[str]) -> None:
    for secret in secrets:
        assert secret not in text


def test_cli_output_and_bundles_hold_no_secret(home: Home, tmp_path: Path) -> None:
    cards = tmp_path / "cards.csv"
    cards.write_text("card_ref,city_code,card_serial,pan,psn,kdd\n"
                     "c1,320200,86843202AD932A48,6214830000000009,01,00010203040506070809\n")
    out = tmp_path / "out"
    env = dict(os.environ)
    runs = [
        ["-v", "bundle", "seal", "--config", str(home.config), "--bureau", "bureau-a", "--batch", "B-canary",
         "--cards", str(cards), "--out", str(out)],
        ["-v", "bundle", "open", "--station-config", str(home.station_config("station-a1")), "--json", str(out)],
        ["-v", "bundle", "open", "--station-config", str(home.station_config("station-a1")), str(out)],
        ["-v", "keys", "list", "--config", str(home.config), "--json"],
        ["selftest", "--vectors", str(VECTORS_PATH), "--json"],
    ]
    text = ""
    for args in runs:
        result = subprocess.run([sys.executable, "-m", "kms.cli", *args], capture_output=True, text=True,
                                timeout=300, cwd=ROOT, env=env)
        text += result.stdout + result.stderr
    assert "UDK" in text or "udk-ac" in text  # the runs did produce output
    secrets = _secrets(home)
    import json

    vectors = json.loads(VECTORS_PATH.read_text())
    secrets += [v["imk"] for v in vectors["option_a"]] + [v["key"] for v in vectors["option_a"]]
    _assert_clean(text, secrets)
    data = (out / "c1.kmsb").read_text()
    c = card(0, card_ref="c1", pan="6214830000000009", kdd="00010203040506070809")
    clear_keys = [spec.recipe.reference(MASTER_KEYS[(d, spec.master_key)], c).hex().upper()
                  for d in ("hrss", "bank") for spec in PROFILE.keys(d)]
    _assert_clean(data, secrets + clear_keys)


def test_station_refusal_logs_no_key_material(
    home: Home, sealers: dict, station: Station, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    data = bytearray(seal(sealers, card(40)))
    data[len(data) // 2] ^= 0x01
    with pytest.raises(BundleRejected) as raised:
        station.open(bytes(data))
    assert str(raised.value) == "bundle rejected"
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert "bundle rejected" in logged
    _assert_clean(logged + str(raised.value), _secrets(home))


def test_a_literal_pin_in_config_is_refused_without_echoing_it(tmp_path: Path) -> None:
    canary = "LiteralPin-4417"
    path = tmp_path / "kms.yaml"
    path.write_text(f"hsm: {{}}\ndomains:\n  bank: {{token: t, pin: '{canary}'}}\ndatabase: sqlite:///x.db\n")
    with pytest.raises(ConfigError) as raised:
        config.load(path)
    assert canary not in str(raised.value)
    assert "domains.bank.pin" in str(raised.value)
