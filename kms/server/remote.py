"""The front end's side of the worker services (``workers:`` in kms.yaml; kms.server.worker is the other side).

``RemotePool`` is a domain's workers as ``kms serve`` uses them (kms.issuance.workers.Pool, as DomainPool), reached
over the domain worker service's Unix socket; ``RemoteSigner`` is the audit signer (kms.audit.signer.Signer). The
front end holds no PIN for them and never reads one.

A worker service that is down (or restarting) makes calls fail Unavailable (UNAVAILABLE, retryable) and its health
dependency fail (``hsm.<domain>``, ``audit-signer``: the services that need it NOT_SERVING); the channel reconnects
on its own within about a second of the service coming back. An error the worker raised comes back as the same kms
error (kms.errors.rebuilt).
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, TypeVar

import grpc

from kms import metrics
from kms.errors import ConfigError, HsmLoginFailed, KmsError, Unavailable, from_status
from kms.issuance.workers import CHUNK, Job, Pins, SectionResult
from kms.server import worker as api
from kms.v1 import worker_pb2 as pb
from kms.v1 import worker_pb2_grpc as rpc
from kms.validation import chunks

T = TypeVar("T")
log = logging.getLogger(__name__)

START_SECONDS = 30.0  # how long ``start`` waits for a worker service that is starting too
CALL_SECONDS = 600.0  # a chunk or key operation (a worker may be replacing its processes meanwhile)
WATCHER_SECONDS = 0.3
CONNECT_SECONDS = 2.0  # how long a call waits for a channel that is reconnecting (its backoff is at most 1 s)
_OPTIONS = [("grpc.max_receive_message_length", api.MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", api.MAX_MESSAGE_BYTES),
            # Back within about a second of a worker service that restarted (gRPC's default waits up to 2 minutes).
            ("grpc.initial_reconnect_backoff_ms", 100), ("grpc.min_reconnect_backoff_ms", 100),
            ("grpc.max_reconnect_backoff_ms", 1000)]


def _error(name: str, error: grpc.RpcError) -> KmsError:
    """The kms error a failed call stands for: the worker's own (trailing metadata), or the transport's."""
    for key, value in error.trailing_metadata() or ():
        if key == api.ERROR_KEY and isinstance(value, bytes):
            try:
                return api.error_from(pb.WorkerError.FromString(value))
            except Exception:  # a worker that sends what it should not: its status below
                break
    code = error.code()
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED):
        return Unavailable(f"the {name} worker service is unavailable; try again")
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return Unavailable(f"the {name} worker service does not answer; try again")
    return from_status(code.name, f"the {name} worker service: {error.details()}")


class _Remote:
    def __init__(self, name: str, endpoint: str, setting: str) -> None:
        self.name = name
        self.endpoint = endpoint
        self.setting = setting
        self.channel = grpc.insecure_channel(endpoint, options=_OPTIONS)
        self.refused: HsmLoginFailed | None = None
        self.restarts = 0
        self.processes = 1
        self._watched = 0.0  # time.monotonic() of the last ``connect``

    def connect(self, seconds: float = CONNECT_SECONDS) -> None:
        """Wait up to ``seconds`` for the channel to be connected (a worker service that just came back: the channel
        is reconnecting); a call made after that fails at once if the service is still not there."""
        ready = grpc.channel_ready_future(self.channel)
        try:
            ready.result(timeout=seconds)
        except grpc.FutureTimeoutError:
            ready.cancel()  # no longer watching the channel
        finally:
            self._watched = time.monotonic()

    def _unary(self, method: Callable[..., Any], request: Any, timeout: float, *, wait: bool = False) -> Any:
        if not wait:
            self.connect()
        try:
            return method(request, timeout=timeout, wait_for_ready=wait)
        except grpc.RpcError as error:
            raised = _error(self.name, error)
        if isinstance(raised, HsmLoginFailed):
            self.refused = raised
        raise raised

    def _noted(self, response: pb.ProbeResponse) -> str | None:
        self.processes = max(1, response.processes)
        self.restarts = response.restarts
        if response.refused and self.refused is None:
            self.refused = HsmLoginFailed(response.failing or f"the {self.name} token refused the PIN")
        return response.failing or None

    def _start(self, probe: Callable[..., pb.ProbeResponse]) -> None:
        """Fail fast (``kms serve``): the worker service answers, serves what the setting says, and its token
        works; ConfigError naming the setting otherwise."""
        try:
            response = self._unary(probe, pb.ProbeRequest(), START_SECONDS, wait=True)
        except Unavailable:
            raise ConfigError(f"{self.setting} {self.endpoint}: the worker service does not answer") from None
        if response.serves != self.name:
            raise ConfigError(f"{self.setting} {self.endpoint}: the worker service there serves "
                              f"{response.serves or 'nothing'}, not {self.name}")
        failing = self._noted(response)
        if self.refused is not None:
            raise self.refused
        if failing is not None:
            raise ConfigError(f"{self.setting} {self.endpoint}: {failing}")

    def _probe(self, probe: Callable[..., pb.ProbeResponse], timeout: float) -> str | None:
        try:
            return self._noted(self._unary(probe, pb.ProbeRequest(timeout_seconds=timeout), timeout + 5))
        except Unavailable:
            return "the worker service cannot be reached"
        except KmsError as error:
            return f"the worker service failed the probe ({type(error).__name__})"

    def pids(self) -> list[int]:
        """No process of this pool runs here (the worker service's own are not this process's children)."""
        return []

    def close(self) -> None:
        # gRPC's connectivity watcher (``connect``) polls the channel until 0.2 s after its last subscriber left; a
        # channel closed before that makes it fail in its own thread.
        time.sleep(max(0.0, self._watched + WATCHER_SECONDS - time.monotonic()))
        self.channel.close()

    def terminate(self) -> None:
        self.close()


class RemotePool(_Remote):
    """One domain's workers in its worker service (kms.issuance.workers.Pool)."""

    def __init__(self, domain: str, endpoint: str) -> None:
        super().__init__(domain, endpoint, f"workers.{domain}")
        self.domain = domain
        self._stub = rpc.DomainWorkerStub(self.channel)  # type: ignore[no-untyped-call]

    def start(self) -> None:
        self._start(self._stub.Probe)

    def seal(self, jobs: Iterable[Job], batch: str, bureau: str, profile: str, pins: Pins = ()
             ) -> Iterator[SectionResult]:
        """Sections in the order of ``jobs``, as DomainPool.seal: chunks of CHUNK cards, 4 per worker process in
        flight. If the worker service goes away, the call ends Unavailable; the cards not yet returned were not
        issued by it."""
        pending: deque[Any] = deque()
        window = 4 * self.processes
        self.connect()
        pinned = [pb.KeyVersion(name=name, version=version) for name, version in pins]

        def take() -> list[SectionResult]:
            future = pending.popleft()
            try:
                response = future.result()
            except grpc.RpcError as error:
                raised = _error(self.name, error)
                if isinstance(raised, HsmLoginFailed):
                    self.refused = raised
                raise raised from None
            metrics.observe_hsm_calls(self.domain, api.calls_from(response.hsm_calls))
            return [api.section_from(section) for section in response.sections]

        try:
            for chunk in chunks(jobs, CHUNK):
                request = pb.SealChunkRequest(jobs=[api.job_message(job) for job in chunk], batch=batch,
                                              bureau=bureau, profile=profile, pins=pinned)
                pending.append(self._stub.SealChunk.future(request, timeout=CALL_SECONDS))
                while len(pending) >= window:
                    yield from take()
            while pending:
                yield from take()
        finally:
            for future in pending:
                future.cancel()

    def call(self, function: Callable[..., T], *args: Any, ceremony: str = "") -> T:
        """``function(worker, *args)`` in one of the domain's workers: only the operations of
        kms.server.worker.OPERATIONS, sent by name with their arguments, and the ceremony a key-changing one
        executes (the worker service checks that ceremony itself: kms.ceremony.binding)."""
        op = api.operation_for(function)
        request = pb.KeyOperationRequest(**{op.field: op.request(*args)}, ceremony_id=ceremony)
        result: T = op.value(self._unary(self._stub.KeyOperation, request, CALL_SECONDS))
        return result

    def probe(self, timeout: float = 30.0) -> str | None:
        return self._probe(self._stub.Probe, timeout)

    def recycle(self) -> None:
        self._unary(self._stub.Recycle, pb.RecycleRequest(), CALL_SECONDS)


class RemoteSigner(_Remote):
    """The audit signer in its worker service (kms.audit.signer.Signer)."""

    def __init__(self, endpoint: str) -> None:
        super().__init__("audit", endpoint, "workers.audit")
        self._stub = rpc.AuditSignerWorkerStub(self.channel)  # type: ignore[no-untyped-call]

    def start(self) -> None:
        self._start(self._stub.Probe)

    def check(self, timeout: float = 30.0) -> str | None:
        """None if the signer answers with a working token session (the worker service replaces a signer process
        that died when it is probed), else why not."""
        return self._probe(self._stub.Probe, timeout)

    def supervise(self) -> bool:
        """Nothing to do here: the worker service supervises its signer process."""
        return False

    def signed_head(self) -> tuple[int, str]:
        response = self._unary(self._stub.SignedHead, pb.SignedHeadRequest(), 60)
        return int(response.size), str(response.head)

    def sign(self, size: int, head: str, at: str, digests: list[bytes],
             base: tuple[int, str] | None = None) -> bytes:
        request = pb.SignCheckpointRequest(size=size, head=head, at=at, digests=digests, base=_base(base))
        return bytes(self._unary(self._stub.SignCheckpoint, request, 120).signature)

    def seal(self, size: int, head: str, at: str, nonce: str, filters: Mapping[str, str],
             digests: list[bytes], base: tuple[int, str] | None = None) -> bytes:
        request = pb.SignSealRequest(size=size, head=head, at=at, nonce=nonce, filters=dict(filters),
                                     digests=digests, base=_base(base))
        return bytes(self._unary(self._stub.SignSeal, request, 120).signature)


def _base(base: tuple[int, str] | None) -> pb.SignedHeadBase | None:
    """The signed head a signing request starts from (compare and swap in the signer), or none."""
    return None if base is None else pb.SignedHeadBase(size=base[0], head=base[1])
