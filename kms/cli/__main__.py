"""`python -m kms.cli`: the `kms` command line."""

import sys

from kms.cli.main import main

sys.exit(main())
