"""The plain-HTTP listener for load balancers and Prometheus (``server.health_listen``, loopback by default):

- ``GET /healthz``: liveness — 200 while the process answers.
- ``GET /readyz``: readiness — 200 only when every dependency works (kms.server.health), else 503; the JSON body
  names what does not work, each gRPC service's status and the replica (``server.replica``).
- ``GET /metrics``: the Prometheus text exposition of prometheus_client's default registry.

No client certificate (it serves no key, card or record, and no secret: statuses and reasons only); keep it on
loopback or a management network. Only GET and HEAD; anything else is 405, an unknown path 404. A connection that
sends no complete request within ``REQUEST_TIMEOUT`` seconds is closed (each connection holds a thread while open).
"""

from __future__ import annotations

import json
import logging
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest

from kms.errors import ConfigError
from kms.server.health import HealthMonitor

log = logging.getLogger(__name__)

#: Seconds a connection may take to send its request (and to read the answer) before it is closed.
REQUEST_TIMEOUT = 10.0


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], monitor: HealthMonitor, family: int, timeout: float) -> None:
        self.address_family = family
        self.monitor = monitor
        self.request_timeout = timeout
        super().__init__(address, _Handler)


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    server_version = "kms"
    sys_version = ""

    def setup(self) -> None:
        super().setup()
        self.connection.settimeout(self.server.request_timeout)  # a silent or slow client is dropped (slowloris)

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        if path == "/healthz":
            self._send(200, "application/json", json.dumps({"status": "alive"}).encode())
        elif path == "/readyz":
            ready, failing, services = self.server.monitor.status()
            body = {"status": "ready" if ready else "not ready", "failing": failing, "services": services,
                    **({"replica": self.server.monitor.replica} if self.server.monitor.replica else {})}
            self._send(200 if ready else 503, "application/json", json.dumps(body, sort_keys=True).encode())
        elif path == "/metrics":
            self._send(200, CONTENT_TYPE_LATEST, generate_latest(REGISTRY))
        else:
            self._send(404, "application/json", json.dumps({"error": "not found"}).encode())

    def do_HEAD(self) -> None:
        self.do_GET()

    def _refuse(self) -> None:
        self._send(405, "application/json", json.dumps({"error": "method not allowed"}).encode(), allow=True)

    do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = _refuse

    def _send(self, code: int, content_type: str, body: bytes, allow: bool = False) -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        if allow:
            self.send_header("Allow", "GET, HEAD")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("health listener: %s %s", self.address_string(), format % args)


class HealthListener:
    """The listener on ``address`` (host:port; port 0 picks one), bound at construction: an address in use is a
    ConfigError naming ``server.health_listen``."""

    def __init__(self, address: str, monitor: HealthMonitor, timeout: float = REQUEST_TIMEOUT) -> None:
        host, _, port_text = address.rpartition(":")
        host = host.strip("[]") or "127.0.0.1"
        try:
            port = int(port_text)
            if not 0 <= port <= 65535:
                raise ValueError(port)
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            self._server = _Server((host, port), monitor, family, timeout)
        except ValueError:
            raise ConfigError(f"server.health_listen {address}: the port must be a number from 0 to 65535") from None
        except OSError as error:
            raise ConfigError(f"server.health_listen {address}: {(error.strerror or str(error)).lower()}") from None
        self.host = host
        self.port: int = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, name="kms-health-http", daemon=True)

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        if self._thread.is_alive():
            self._server.shutdown()
        self._server.server_close()
