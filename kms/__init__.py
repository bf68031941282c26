"""kms: HSM-backed key management for the social security card with financial function."""

__version__ = "0.1.0"
