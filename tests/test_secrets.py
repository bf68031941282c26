"""kms.secrets: secret references (env:NAME, file:PATH); errors name the reference, never the value."""

from __future__ import annotations

from pathlib import Path

import pytest

from kms.errors import ConfigError
from kms.secrets import SecretRef

CANARY = "Canary-Secret-51e0b2d8"
VAR = "KMS_TEST_SECRET_CANARY"


def _resolve_error(ref: SecretRef) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        ref.resolve()
    message = str(info.value)
    assert str(ref) in message  # names the reference
    assert CANARY not in message
    assert CANARY not in repr(info.value)
    return info.value


# -- parse ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "scheme", "target"),
    [
        ("env:KMS_PIN", "env", "KMS_PIN"),
        ("file:/run/secrets/pin", "file", "/run/secrets/pin"),
        ("file:pins/hrss.pin", "file", "pins/hrss.pin"),  # no base directory: kept as written
        ("env:A:B", "env", "A:B"),  # only the first colon separates
    ],
)
def test_parse(text: str, scheme: str, target: str) -> None:
    ref = SecretRef.parse(text)
    assert (ref.scheme, ref.target) == (scheme, target)
    assert str(ref) == text


def test_parse_relative_file_against_base_dir(tmp_path: Path) -> None:
    ref = SecretRef.parse("file:pins/hrss.pin", base_dir=tmp_path)
    assert ref == SecretRef("file", str(tmp_path / "pins" / "hrss.pin"))


def test_parse_absolute_file_ignores_base_dir(tmp_path: Path) -> None:
    assert SecretRef.parse("file:/run/secrets/pin", base_dir=tmp_path).target == "/run/secrets/pin"


def test_parse_env_ignores_base_dir(tmp_path: Path) -> None:
    assert SecretRef.parse("env:KMS_PIN", base_dir=tmp_path).target == "KMS_PIN"


@pytest.mark.parametrize(
    "text", [CANARY, f"{CANARY}:x", f"vault:{CANARY}", f"ENV:{CANARY}", "env:", "file:", "", f" env:{CANARY}"]
)
def test_parse_rejects_literals_without_echoing_them(text: str) -> None:
    with pytest.raises(ConfigError) as info:
        SecretRef.parse(text, field="domains.bank.pin")
    message = str(info.value)
    assert message.startswith("domains.bank.pin:")
    assert "never a literal" in message
    assert CANARY not in message


# -- resolve: environment ------------------------------------------------------------------------------------------


def test_resolve_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(VAR, CANARY)
    assert SecretRef("env", VAR).resolve() == CANARY


def test_resolve_env_keeps_the_value_as_is(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(VAR, f" {CANARY} ")
    assert SecretRef("env", VAR).resolve() == f" {CANARY} "


def test_resolve_missing_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(VAR, raising=False)
    assert "not set" in str(_resolve_error(SecretRef("env", VAR)))


def test_resolve_empty_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(VAR, "")
    _resolve_error(SecretRef("env", VAR))


def test_resolve_env_error_does_not_leak_other_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(VAR + "_OTHER", CANARY)
    monkeypatch.delenv(VAR, raising=False)
    _resolve_error(SecretRef("env", VAR))


# -- resolve: file -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "content",
    [f"{CANARY}", f"{CANARY}\n", f"{CANARY}\r\n", f"  {CANARY}  \nsecond line\n", f"{CANARY}\nignored\n"],
)
def test_resolve_file_first_line_stripped(tmp_path: Path, content: str) -> None:
    path = tmp_path / "pin"
    path.write_bytes(content.encode("utf-8"))
    assert SecretRef("file", str(path)).resolve() == CANARY


def test_resolve_file_via_parse(tmp_path: Path) -> None:
    (tmp_path / "pins").mkdir()
    (tmp_path / "pins" / "hrss.pin").write_text(CANARY + "\n", encoding="utf-8")
    assert SecretRef.parse("file:pins/hrss.pin", base_dir=tmp_path).resolve() == CANARY


@pytest.mark.parametrize("content", ["", "\n", "   \n\n", f"\n{CANARY}\n"])
def test_resolve_empty_file(tmp_path: Path, content: str) -> None:
    # A blank first line means no secret, even if something follows (and that something is never echoed).
    path = tmp_path / "pin"
    path.write_text(content, encoding="utf-8")
    assert "empty" in str(_resolve_error(SecretRef("file", str(path))))


def test_resolve_missing_file(tmp_path: Path) -> None:
    assert "cannot read" in str(_resolve_error(SecretRef("file", str(tmp_path / "absent.pin"))))


def test_resolve_unreadable_file(tmp_path: Path) -> None:
    # A directory cannot be read as a file, whoever runs the test (root ignores mode bits).
    path = tmp_path / "pin.d"
    path.mkdir()
    (path / "inside").write_text(CANARY, encoding="utf-8")
    assert "cannot read" in str(_resolve_error(SecretRef("file", str(path))))


def test_resolve_non_utf8_file(tmp_path: Path) -> None:
    path = tmp_path / "pin"
    path.write_bytes(CANARY.encode() + b"\xff\xfe\n")
    _resolve_error(SecretRef("file", str(path)))
