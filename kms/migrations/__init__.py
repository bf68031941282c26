"""The schema of the records database as Alembic revisions: ``env.py`` (Alembic's environment) and ``versions/``
(one module per revision, never edited once released). The rest of kms reaches them only through ``kms.store``
(``schema_status``, ``upgrade``, ``require_current``); ``kms db upgrade`` and ``kms db current`` are the operator's
commands (docs/operations.md, "Upgrading kms (schema migrations)")."""
