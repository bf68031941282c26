"""The `kms` command line: one module per command group; `python -m kms.cli` runs it."""

import os

# gRPC's C core logs to stderr on its own, in its own format: errors only, unless the operator sets GRPC_VERBOSITY
# (read when grpc is imported, which the command groups do). docs/operations.md, "Metrics and logs".
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
