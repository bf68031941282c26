"""The real OpenBao dev server for tests: kms.dev.openbao (also used by ``scripts/demo.py --secrets openbao``).

Kept as a module of its own so that tests import it as before (``from openbao import BaoServer``)."""

from kms.dev.openbao import START_SECONDS, BaoServer, binary

__all__ = ["START_SECONDS", "BaoServer", "binary"]
