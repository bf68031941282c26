"""Clients of the service: the service client, the officer's ceremony client, the auditor's client."""
