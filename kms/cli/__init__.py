"""The `kms` command line: one module per command group; `python -m kms.cli` runs it."""
