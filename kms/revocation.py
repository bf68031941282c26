"""Certificate revocation lists (CRLs), on both ends of the service's mutual TLS.

gRPC Python cannot check CRLs itself, so:

- **Server** (``server.tls.crl`` in kms.yaml): ``RevocationList`` is a certificate check of kms.server.frame: it runs
  first on every call, and a client certificate whose serial its issuer's CRL lists is refused (PERMISSION_DENIED,
  recorded as ``request.refused``). The CRL file (PEM, one or more CRLs) must hold, for every CA of the client CA file
  (``server.tls.ca``), a CRL that CA signed. The file is looked at (``stat``) on every call and read again when it
  changed, so revoking needs no restart. A file that cannot be used at start is a ConfigError; a bad replacement
  while serving is logged as an error and the last good CRLs stay in force. So is a replacement holding a CRL
  older than the newest seen of its issuer (a lower CRL number, or without CRL numbers an earlier lastUpdate):
  putting an old file back would otherwise un-revoke certificates. A CRL past its nextUpdate is still enforced
  (a stale list is better than none), with a warning in the log once per CRL.
- **Client** (``client.tls.crl`` in a client or station configuration): before it opens a gRPC channel, the client
  makes one TLS handshake of its own with Python's ``ssl`` (its certificate, the CA, the CRL, ``VERIFY_CRL_CHECK_LEAF``)
  to the same address and refuses a revoked server certificate. With several endpoints (``host:port,host:port``)
  each resolved address is checked, and one that cannot be reached then is left out of the channel. The check is
  per channel, not per connection: a channel that reconnects later (to another replica behind the same address,
  say) is not checked again. OpenSSL
  refuses a CRL past its nextUpdate here, so a client needs a current CRL to connect at all.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import re
import socket
import ssl
import threading
from collections.abc import Callable
from pathlib import Path

from cryptography import x509

from kms import errors
from kms.config import TlsConfig
from kms.identity import from_certificate

log = logging.getLogger(__name__)

_PEM_CRL = re.compile(rb"-----BEGIN X509 CRL-----\r?\n.+?-----END X509 CRL-----", re.S)
#: OpenSSL's X509_V_ERR_CERT_REVOKED and X509_V_ERR_CRL_HAS_EXPIRED
_CERT_REVOKED = 23
_CRL_HAS_EXPIRED = 12

Crls = dict[x509.Name, x509.CertificateRevocationList]
_Stat = tuple[int, int, int, int]


def serial_text(cert: x509.Certificate) -> str:
    """A certificate serial as messages and audit records show it: 0x and upper-case hex (as openssl prints it)."""
    return f"0x{cert.serial_number:X}"


def _stat(st: os.stat_result) -> _Stat:
    return st.st_mtime_ns, st.st_size, st.st_ino, st.st_dev


def _read(path: Path) -> tuple[bytes, _Stat | None]:
    """The file's bytes and its stat, or None for the stat if it changed while being read."""
    with path.open("rb") as f:
        before = _stat(os.fstat(f.fileno()))
        data = f.read()
        after = _stat(os.fstat(f.fileno()))
    return data, before if before == after else None


def _ca_certificates(ca_path: Path) -> list[x509.Certificate]:
    try:
        return x509.load_pem_x509_certificates(ca_path.read_bytes())
    except OSError as error:
        raise errors.ConfigError(f"{ca_path}: cannot read ({error.strerror})") from None
    except ValueError:
        raise errors.ConfigError(f"{ca_path}: not PEM CA certificates") from None


def crl_number(crl: x509.CertificateRevocationList) -> int | None:
    """The CRL number extension's value, or None if the CRL has none."""
    try:
        return crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
    except x509.ExtensionNotFound:
        return None


def _version(crl: x509.CertificateRevocationList) -> tuple[int | None, dt.datetime]:
    return crl_number(crl), crl.last_update_utc


def _older(version: tuple[int | None, dt.datetime], than: tuple[int | None, dt.datetime]) -> bool:
    """Whether a CRL of ``version`` (CRL number, lastUpdate) predates one of ``than``: by CRL number when both
    have one (RFC 5280 5.2.3: it only increases), else by lastUpdate."""
    (number, last_update), (other_number, other_last_update) = version, than
    if number is not None and other_number is not None:
        return number < other_number
    return last_update < other_last_update


def _signed_by(crl: x509.CertificateRevocationList, ca: x509.Certificate) -> bool:
    if crl.issuer != ca.subject:
        return False
    try:
        usage = ca.extensions.get_extension_for_class(x509.KeyUsage).value
        if not usage.crl_sign:
            return False
    except x509.ExtensionNotFound:
        pass
    try:
        return crl.is_signature_valid(ca.public_key())  # type: ignore[arg-type]  # EC and RSA CA keys
    except (TypeError, ValueError):
        return False


def parse_crls(data: bytes, where: str, ca_path: Path) -> Crls:
    """The CRLs in PEM ``data``, each verified against the CA certificates in ``ca_path``: by issuer, the newest
    of each CA (highest CRL number, else lastUpdate). Every CA of the file must have one. ConfigError otherwise
    (``where`` names the source in the message)."""
    cas = _ca_certificates(ca_path)
    blocks = _PEM_CRL.findall(data)
    if not blocks:
        raise errors.ConfigError(f"{where}: no PEM certificate revocation list (-----BEGIN X509 CRL-----)")
    crls: Crls = {}
    for number, block in enumerate(blocks, start=1):
        try:
            crl = x509.load_pem_x509_crl(block)
        except ValueError:
            raise errors.ConfigError(f"{where}: CRL {number} is not a valid CRL") from None
        if not any(_signed_by(crl, ca) for ca in cas):
            raise errors.ConfigError(f"{where}: CRL {number} (issuer {crl.issuer.rfc4514_string()}) is not signed by "
                                     f"a CA of {ca_path}")
        known = crls.get(crl.issuer)
        if known is None or _older(_version(known), _version(crl)):
            crls[crl.issuer] = crl
    for ca in cas:
        if ca.subject not in crls:
            raise errors.ConfigError(f"{where}: no CRL of {ca.subject.rfc4514_string()}, a CA of {ca_path}")
    return crls


def load_crls(crl_path: Path, ca_path: Path) -> Crls:
    """The CRL file's CRLs, verified (parse_crls); ConfigError if it cannot be read or used."""
    try:
        data, _ = _read(crl_path)
    except OSError as error:
        raise errors.ConfigError(f"{crl_path}: cannot read ({error.strerror})") from None
    return parse_crls(data, str(crl_path), ca_path)


def _who(cert: x509.Certificate) -> str:
    """The kms principal a certificate names, for messages (best effort: the certificate may name none)."""
    try:
        return f" of {from_certificate(cert)}"
    except Exception:  # a certificate naming no principal is refused all the same
        return ""


class RevocationList:
    """The server's check of client certificates against the CRL file (a kms.server.frame CertificateCheck)."""

    def __init__(self, crl_path: Path, ca_path: Path,
                 now: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.UTC)) -> None:
        self._path = crl_path
        self._ca = ca_path
        self._now = now
        self._lock = threading.Lock()
        self._warned: set[tuple[x509.Name, dt.datetime]] = set()
        try:
            data, stat = _read(crl_path)
        except OSError as error:
            raise errors.ConfigError(f"server.tls.crl: {crl_path}: cannot read ({error.strerror})") from None
        self._crls = parse_crls(data, f"server.tls.crl: {crl_path}", ca_path)
        # Per issuer, the highest CRL number and the latest lastUpdate of the CRLs in force so far: a later file
        # with an older CRL is refused (_refuse_older), even if the issuer left the file for a while.
        self._newest = {issuer: _version(crl) for issuer, crl in self._crls.items()}
        self._stat = stat  # of the file the CRLs in force came from (None: read again on the next call)
        self._rejected: _Stat | str | None = None  # the file (or error) last refused, so it is logged once
        log.info("%s: %d CRL(s), %d revoked certificate(s)", crl_path, len(self._crls), self.revoked_count)

    @property
    def revoked_count(self) -> int:
        return sum(len(crl) for crl in self._crls.values())

    def __call__(self, cert: x509.Certificate) -> None:
        self.check(cert)

    def check(self, cert: x509.Certificate) -> None:
        """Refuse (PermissionDenied) a certificate its issuer's CRL lists, or whose issuer has no CRL here."""
        self._refresh()
        crl = self._crls.get(cert.issuer)
        if crl is None:
            raise errors.PermissionDenied(f"the client certificate{_who(cert)} (serial {serial_text(cert)}) comes "
                                          "from an issuer without a certificate revocation list here")
        self._warn_if_stale(crl)
        if crl.get_revoked_certificate_by_serial_number(cert.serial_number) is not None:
            raise errors.PermissionDenied(f"the client certificate{_who(cert)} (serial {serial_text(cert)}) is "
                                          "revoked")

    def _warn_if_stale(self, crl: x509.CertificateRevocationList) -> None:
        next_update = crl.next_update_utc
        if next_update is None or self._now() <= next_update:
            return
        key = (crl.issuer, crl.last_update_utc)
        if key not in self._warned:
            self._warned.add(key)
            log.warning("%s: the CRL of %s is past its nextUpdate (%s); it is still enforced: publish a current one",
                        self._path, crl.issuer.rfc4514_string(), next_update.isoformat())

    def _refresh(self) -> None:
        """Read the file again if it changed (a stat per call); a bad file keeps the CRLs in force."""
        try:
            current: _Stat | str = _stat(os.stat(self._path))
        except OSError as error:
            current = f"cannot read ({error.strerror})"
        if current == self._stat or current == self._rejected:
            return
        with self._lock:
            if current == self._stat or current == self._rejected:
                return
            try:
                data, stat = _read(self._path)
                crls = parse_crls(data, str(self._path), self._ca)
                self._refuse_older(crls)
            except (OSError, errors.ConfigError) as error:
                reason = f"{self._path}: cannot read ({error.strerror})" if isinstance(error, OSError) else str(error)
                log.error("%s; the revocation list loaded before stays in force", reason)
                self._rejected = current
                return
            self._crls, self._stat, self._rejected = crls, stat, None
            for issuer, crl in crls.items():
                number, last_update = _version(crl)
                if issuer in self._newest:
                    seen_number, seen_last_update = self._newest[issuer]
                    if seen_number is not None:
                        number = seen_number if number is None else max(number, seen_number)
                    last_update = max(last_update, seen_last_update)
                self._newest[issuer] = number, last_update
            log.warning("%s reloaded: %d CRL(s), %d revoked certificate(s)", self._path, len(crls),
                        self.revoked_count)

    def _refuse_older(self, crls: Crls) -> None:
        """ConfigError if a CRL of ``crls`` is older than the newest in force so far for its issuer (a rollback)."""
        for issuer, crl in crls.items():
            newest = self._newest.get(issuer)
            if newest is not None and _older(_version(crl), newest):
                number, last_update = _version(crl)
                newest_number, newest_last_update = newest
                if number is not None and newest_number is not None:
                    detail = f"CRL number {number}, the newest seen is {newest_number}"
                else:
                    detail = (f"lastUpdate {last_update.isoformat()}, the newest seen is "
                              f"{newest_last_update.isoformat()}")
                raise errors.ConfigError(f"{self._path}: the CRL of {issuer.rfc4514_string()} is older than the "
                                         f"one in force ({detail}): refused, it would un-revoke certificates")


def _load_cert_chain(context: ssl.SSLContext, tls: TlsConfig) -> None:
    """Our certificate and private key into ``context``. Python's ssl loads a key only from a file: a key kept in
    OpenBao goes through an anonymous in-memory file (memfd), never onto a disk."""
    if isinstance(tls.key, Path):
        context.load_cert_chain(str(tls.cert), str(tls.key))
        return
    pem = tls.private_key("client.tls.key")
    fd = os.memfd_create("kms-tls-key", os.MFD_CLOEXEC)
    try:
        os.write(fd, pem)
        context.load_cert_chain(str(tls.cert), f"/proc/self/fd/{fd}")
    finally:
        os.close(fd)


def check_server_certificate(tls: TlsConfig, address: str, timeout: float = 30.0, name: str | None = None) -> None:
    """With ``tls.crl``: one TLS handshake to ``address`` (host:port) as the gRPC channel would make it, the
    server's certificate checked against the CRL (and against ``name``, the TLS name the channel checks, when the
    address is not by that name: an address kms.client.service.target resolved, the only addresses the channel
    then uses). PermissionDenied if it is
    revoked (or fails verification), ConfigError for a CRL that cannot be used, a retryable HsmError (what an
    unreachable service is elsewhere) if the server cannot be reached. Without a CRL: nothing."""
    if tls.crl is None:
        return
    load_crls(tls.crl, tls.ca)  # a clear message for a bad file, rather than OpenSSL's
    host, _, port = address.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(tls.ca))
    context.load_verify_locations(cafile=str(tls.crl))
    context.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF
    _load_cert_chain(context, tls)
    context.set_alpn_protocols(["h2"])
    try:
        with socket.create_connection((host, int(port)), timeout=timeout) as sock, \
                context.wrap_socket(sock, server_hostname=name or host):
            pass
    except ssl.SSLCertVerificationError as error:
        if error.verify_code == _CERT_REVOKED:
            raise errors.PermissionDenied(f"the server's certificate at {address} is revoked ({tls.crl}); "
                                          "not connecting") from None
        if error.verify_code == _CRL_HAS_EXPIRED:
            raise errors.ConfigError(f"{tls.crl}: the CRL is past its nextUpdate; get a current one") from None
        raise errors.PermissionDenied(f"the server's certificate at {address} failed verification "
                                      f"({error.verify_message})") from None
    except (OSError, ValueError) as error:  # ssl.SSLError is an OSError
        reason = getattr(error, "strerror", None) or getattr(error, "reason", None) or type(error).__name__
        raise errors.HsmError(f"service: unavailable: cannot reach {address} ({reason})", retryable=True) from None
