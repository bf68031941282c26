"""What every record store shares: its database engine, clock and audit log, and the retry of a conditional change.

A store changes a row only if it still holds what was read (a conditional UPDATE, or a version column): another
request or replica that changed it meanwhile makes the change a no-op, and the store reads and judges again. After
``ATTEMPTS`` lost races the caller is told to try again rather than waiting without end.
"""

from __future__ import annotations

import sqlalchemy as sa

from kms.audit.log import AuditLog
from kms.clock import Clock
from kms.errors import InvalidState

ATTEMPTS = 5  # reads and conditional changes of one record before InvalidState("... keeps changing")


class Repository:
    """A store over ``engine``: changes are stamped by ``clock`` and, with ``audit``, chained into the audit log in
    the same transaction."""

    def __init__(self, engine: sa.Engine, clock: Clock, audit: AuditLog | None = None) -> None:
        self._engine = engine
        self._clock = clock
        self._audit = audit

    @staticmethod
    def _kept_changing(what: str) -> InvalidState:
        """What to raise when every one of ``ATTEMPTS`` reads and conditional changes of ``what`` lost its race:
        ``for _ in range(ATTEMPTS): ... return ...`` then ``raise self._kept_changing("card X")``."""
        return InvalidState(f"{what} keeps changing; try again")
