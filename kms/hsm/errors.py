"""PKCS#11 errors translated to kms errors (retryable or not), with readable messages; nothing from the token's
memory ever reaches a message.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator

import pkcs11.exceptions as p11e

from kms.errors import HsmError, HsmLoginFailed, MechanismUnavailable

_RETRYABLE = (
    p11e.DeviceError,
    p11e.DeviceMemory,
    p11e.DeviceRemoved,
    p11e.HostMemory,
    p11e.ObjectHandleInvalid,  # a handle gone stale (the token went away); the session is opened again
    p11e.SessionClosed,
    p11e.SessionHandleInvalid,
    p11e.SessionCount,
    p11e.TokenNotPresent,
    p11e.TokenNotRecognised,
    p11e.UserNotLoggedIn,
)
_UNDECRYPTABLE = (p11e.EncryptedDataInvalid, p11e.EncryptedDataLenRange, p11e.DataInvalid, p11e.DataLenRange,
                  p11e.GeneralError)
#: The reason a ciphertext sent in (a custodian's component) is refused when the token cannot decrypt it.
UNDECRYPTABLE = "cannot be decrypted with the custody key (RSA-OAEP, SHA-1)"
_LOGIN = (p11e.PinIncorrect, p11e.PinLocked, p11e.PinExpired, p11e.PinInvalid, p11e.PinLenRange)
_REFUSED_EXTRACT = (p11e.KeyUnextractable, p11e.AttributeSensitive, p11e.KeyNotWrappable)


def _translate(error: p11e.PKCS11Error, what: str) -> HsmError:
    kind = type(error).__name__
    if isinstance(error, _LOGIN):
        return HsmLoginFailed(f"{what}: the token refused the PIN ({kind})")
    if isinstance(error, p11e.MechanismInvalid):
        return MechanismUnavailable(kind, "", what)
    if isinstance(error, _REFUSED_EXTRACT):
        return HsmError(f"{what}: refused by the token, the key may not leave it ({kind})")
    if isinstance(error, _RETRYABLE):
        return HsmError(f"{what}: the HSM is unavailable ({kind})", retryable=True)
    return HsmError(f"{what}: the HSM refused the operation ({kind})")


@contextlib.contextmanager
def _hsm(what: str) -> Iterator[None]:
    try:
        yield
    except p11e.PKCS11Error as error:
        raise _translate(error, what) from None




def short_reason(error: Exception) -> str:
    """A few words on why a token cannot be used, for health reports (served without a client certificate) and
    callers: the PKCS#11 error's name if the message ends with one, else the kind of failure — never a path, a
    module or a token label (those go to the log)."""
    text = str(error)
    if "no token labelled" in text:
        return "the token is not present"
    named = re.search(r"\(([^()]*)\)\)*$", text)
    return named[1] if named else type(error).__name__
