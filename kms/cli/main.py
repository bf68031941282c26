"""The ``kms`` command line: the parser assembled from one module per command group, and the one place that turns
an error into a line on stderr and an exit status (kms.errors)."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Sequence
from importlib import metadata

from kms import errors
from kms.cli import audit, batch, bundle, ceremony, db, dev, keys, serve, station, worker
from kms.files import restrict_umask

log = logging.getLogger(__name__)

#: The command groups, in the order ``kms --help`` lists them; each adds its parsers and sets their ``handler``.
GROUPS = (dev, keys, bundle, serve, worker, db, batch, ceremony, audit, station)

#: The exit status when stdout is a closed pipe (``kms keys list ... | head -1``): 128 + SIGPIPE, as git's.
BROKEN_PIPE = 141

DESCRIPTION = """\
HSM-backed key management for the social security card with financial function: two key domains (hrss, bank) in
their own PKCS#11 tokens, key ceremonies under dual control, sealed bundles for personalization bureaus, and a
tamper-evident audit log.

Results go to stdout (JSON with --json); errors, prompts and progress to stderr. Defaults from the environment
(a flag wins): KMS_CONFIG (--config), KMS_CLIENT (--client), KMS_STATION_CONFIG (--station-config), KMS_SERVER
(--server).

Exit statuses: 0 success; 1 internal error; 2 invalid argument; 3 configuration or failed precondition; 4 not found
or already exists; 5 permission denied; 6 HSM or other service error; 7 bundle rejected; 8 deadline exceeded; 9 an
audit export does not verify; 10 the audit chain is broken; 11 an issuance limit reached; 12 service unavailable
(retryable); 13 the audit log cannot be written (retryable); 14 not approved; 130 interrupted; 141 stdout closed
(a pipe)."""


def version() -> str:
    try:
        return metadata.version("kms")
    except metadata.PackageNotFoundError:  # run from a checkout that was never installed
        return "unknown"


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kms", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example:\n  kms init home && kms serve --config home/kms.yaml\n  kms ceremony propose --help")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress and debug details to stderr")
    parser.add_argument("--version", action="version", version=f"kms {version()}",
                        help="print kms's version and exit")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for group in GROUPS:
        group.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    restrict_umask()  # whatever kms writes, and the processes it starts write, is the user's alone (kms.files)
    try:
        args = parser().parse_args(argv)
    except BrokenPipeError:  # `kms --help | head -1`
        return _broken_pipe()
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, format="kms: %(message)s")
    handler: Callable[[argparse.Namespace], int] = args.handler
    try:
        code = handler(args)
        sys.stdout.flush()  # a closed pipe shows here rather than at exit
        return code
    except BrokenPipeError:
        return _broken_pipe()
    except errors.KmsError as error:
        print(f"kms: error: {error}", file=sys.stderr)
        return errors.exit_code(error)
    except KeyboardInterrupt:
        print("kms: interrupted", file=sys.stderr)
        return 130
    except Exception as error:  # an unexpected failure: say what kind, never what data
        log.debug("unexpected error", exc_info=True)
        print(f"kms: internal error ({type(error).__name__}); run with -v for details", file=sys.stderr)
        return 1


def _broken_pipe() -> int:
    """Whoever read stdout went away (``| head``): nothing to report. Python would flush stdout again at exit and
    complain; point it at /dev/null first (the recipe in Python's signal documentation)."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):
        pass
    return BROKEN_PIPE


if __name__ == "__main__":
    sys.exit(main())
