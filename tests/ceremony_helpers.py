"""Running ceremonies from tests as officers do (kms.dev.ceremonies)."""

from kms.dev.ceremonies import (
           authorize_batch,
           certificate_pem,
           client,
           client_config_for,
           key,
           officer,
           officer_params,
           open_batch,
           run_ceremony,
)

__all__ = ["authorize_batch", "certificate_pem", "client", "client_config_for", "key", "officer", "officer_params",
           "open_batch", "run_ceremony"]
