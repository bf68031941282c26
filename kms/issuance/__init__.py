"""Issuing cards: the per-domain sealer, worker processes, the issuer, batches and card records, the card
lifecycle, consents, PANs at rest, issuance limits."""
