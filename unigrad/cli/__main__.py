"""`python -m unigrad.cli ...`: the command line, as the `unigrad` script runs it."""

import sys

from unigrad.cli import main

sys.exit(main())
