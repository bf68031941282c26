"""Running ceremonies from tests as officers do (kms.devceremonies)."""

from kms.devceremonies import authorize_batch, client, key, officer, open_batch, run_ceremony

__all__ = ["authorize_batch", "client", "key", "officer", "open_batch", "run_ceremony"]
