"""Per-domain consent for actions on a card that reach more than one key domain (docs/card-lifecycle.md).

Re-issuing a dual-application card sends both domains' keys to a station again, and replacing a card (补换) ends both
applications; neither domain's officer may do either alone. Each domain's officer gives their domain's consent
(``ReissueCard``, ``ReplaceCard``); the action runs, in the same transaction as the last consent, once every domain
it needs has consented. Consents are kept in ``consents`` (kms.store), one per action, subject and domain (a second
officer of the same domain replaces the first one's consent, never adds to it), and count for ``CONSENT_TTL``.

These functions run inside the caller's transaction, so a consent and the action it completes commit together. The
caller locks the subject's row first (``SELECT … FOR UPDATE``), so that consents given at the same moment by two
domains' officers on two replicas are counted one after the other, never both as "still waiting". A consent counts
only for the ``basis`` it was given on (for a re-issue: the card record's state, bundle and binding): once the record
changed — say, the card was issued meanwhile — earlier consents no longer count.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

import sqlalchemy as sa

from kms.clock import rfc3339
from kms.store import consents

CONSENT_TTL = dt.timedelta(hours=24)


@dataclass(frozen=True)
class Consent:
    domain: str
    by: str
    reason: str
    at: str


def give(conn: sa.Connection, action: str, subject: str, domain: str, by: str, reason: str,
         now: dt.datetime, basis: str = "") -> dict[str, Consent]:
    """Record ``domain``'s consent (replacing an earlier one of that domain) and return every consent that still
    counts for this action, subject and basis, by domain."""
    values = dict(by=by, reason=reason, basis=basis, at=rfc3339(now), expires_at=rfc3339(now + CONSENT_TTL))
    changed = conn.execute(consents.update().where(
        consents.c.action == action, consents.c.subject == subject, consents.c.domain == domain)
        .values(**values)).rowcount
    if changed == 0:
        conn.execute(consents.insert().values(action=action, subject=subject, domain=domain, **values))
    return given(conn, action, subject, now, basis)


def given(conn: sa.Connection, action: str, subject: str, now: dt.datetime, basis: str = "") -> dict[str, Consent]:
    """The consents that still count for this action, subject and basis, by domain."""
    rows = conn.execute(sa.select(consents).where(
        consents.c.action == action, consents.c.subject == subject, consents.c.expires_at > rfc3339(now),
        consents.c.basis == basis))
    return {r.domain: Consent(r.domain, r.by, r.reason, r.at) for r in rows}


def clear(conn: sa.Connection, action: str, subject: str) -> None:
    """The action ran (or can no longer run): its consents are used up."""
    conn.execute(consents.delete().where(consents.c.action == action, consents.c.subject == subject))
