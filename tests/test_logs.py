"""Log lines (kms.logs): a UTC timestamp, level and logger on every line, as text or one JSON object per line, with
the request context (request id, caller, method) of the call being handled; `kms serve`'s choice exported to the
processes it starts; gRPC's C core quiet unless asked (kms/cli/__init__.py). The service's log lines, once per event,
and the canary over every line of `kms serve`: tests/server/test_logging.py."""

from __future__ import annotations

import io
import json
import logging
import os
import re
import subprocess
import sys
from typing import Any

import pytest
from helpers import ROOT

from kms import logs
from kms.errors import ConfigError

STAMP = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")
STATUS = "/kms.v1.IssuanceService/GetBatchStatus"


# -- formats -----------------------------------------------------------------------------------------------------


def _record(message: str = "hello %s", *args: Any, exc: bool = False) -> logging.LogRecord:
    exc_info = None
    if exc:
        try:
            raise ValueError("boom")
        except ValueError:
            exc_info = sys.exc_info()
    return logging.LogRecord("kms.server.frame", logging.WARNING, __file__, 1, message, args or ("world",), exc_info)


def test_a_text_line_has_time_level_logger_message_and_the_request_context() -> None:
    bound = logs.bind(request_id="0123456789abcdef", principal="urn:kms:station:bureau-a:station-a1")
    try:
        record = _record()
        assert logs.ContextFilter().filter(record)
    finally:
        logs.unbind(bound)
    line = logs.TextFormatter().format(record)
    assert re.fullmatch(STAMP.pattern + r" WARNING kms\.server\.frame: hello world "
                        r"\[request_id=0123456789abcdef principal=urn:kms:station:bureau-a:station-a1\]", line), line
    assert logs.timestamp(1796143200.1239) == "2026-12-01T16:40:00.123Z"


def test_a_json_line_is_one_object_with_the_fields_and_the_traceback_inside() -> None:
    bound = logs.bind(request_id="r1", method=STATUS)
    try:
        logs.note(error="PermissionDenied", _exc=ValueError("never shown"))
        record = _record("refused %s", "x", exc=True)
        logs.ContextFilter().filter(record)
    finally:
        logs.unbind(bound)
    line = logs.JsonFormatter().format(record)
    assert "\n" not in line
    doc = json.loads(line)
    assert STAMP.fullmatch(doc["time"])
    assert (doc["level"], doc["logger"], doc["message"]) == ("WARNING", "kms.server.frame", "refused x")
    assert (doc["request_id"], doc["method"], doc["error"]) == ("r1", STATUS, "PermissionDenied")
    assert "_exc" not in doc and "never shown" not in line  # private context entries stay out of the line
    assert doc["exception"].startswith("Traceback") and "ValueError: boom" in doc["exception"]
    assert logs.context() == {}  # outside the call again


def test_configure_replaces_the_handlers_and_exports_the_choice_to_children(monkeypatch: pytest.MonkeyPatch) -> None:
    root = logging.getLogger()
    saved, level = list(root.handlers), root.level
    monkeypatch.delenv(logs.ENV_FORMAT, raising=False)
    monkeypatch.delenv(logs.ENV_LEVEL, raising=False)
    out = io.StringIO()
    try:
        logs.configure("debug", "json", out)
        assert (os.environ[logs.ENV_FORMAT], os.environ[logs.ENV_LEVEL]) == ("json", "debug")
        logging.getLogger("kms.test").debug("seen")
        logs.configure_from_env()  # as a worker would: the same format and level (on stderr)
        assert root.level == logging.DEBUG and isinstance(root.handlers[0].formatter, logs.JsonFormatter)
    finally:
        for handler in list(root.handlers):
            root.removeHandler(handler)
        for handler in saved:
            root.addHandler(handler)
        root.setLevel(level)
    assert json.loads(out.getvalue())["message"] == "seen"
    with pytest.raises(ConfigError, match="log format 'xml'"):
        logs.handler("xml")
    with pytest.raises(ConfigError, match="log level 'loud'"):
        logs.level_number("loud")


@pytest.mark.parametrize("preset", [None, "INFO"])
def test_grpc_c_core_logs_only_errors_unless_the_operator_says_otherwise(preset: str | None) -> None:
    env = {k: v for k, v in os.environ.items() if k != "GRPC_VERBOSITY"}
    if preset is not None:
        env["GRPC_VERBOSITY"] = preset
    shown = subprocess.run([sys.executable, "-c", "import os, kms.cli.main, grpc; print(os.environ['GRPC_VERBOSITY'])"],
                           capture_output=True, text=True, check=True, cwd=ROOT, env=env).stdout.strip()
    assert shown == (preset or "ERROR")
