"""The ``kms`` command line: the parser assembled from one module per command group, and the one place that turns
an error into a line on stderr and an exit status (kms.errors)."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence

from kms import errors
from kms.cli import audit, batch, bundle, ceremony, dev, keys, serve, station
from kms.files import restrict_umask

log = logging.getLogger(__name__)

#: The command groups, in the order ``kms --help`` lists them; each adds its parsers and sets their ``handler``.
GROUPS = (dev, keys, bundle, serve, batch, ceremony, audit, station)


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kms", description="HSM-backed key management for social security cards")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress to stderr")
    sub = parser.add_subparsers(dest="command", required=True)
    for group in GROUPS:
        group.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    restrict_umask()  # whatever kms writes, and the processes it starts write, is the user's alone (kms.files)
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, format="kms: %(message)s")
    handler: Callable[[argparse.Namespace], int] = args.handler
    try:
        return handler(args)
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


if __name__ == "__main__":
    sys.exit(main())
