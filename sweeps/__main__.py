"""`python -m sweeps`: the harness's command line (sweeps.cli.main)."""

import sys

from sweeps.cli import main

sys.exit(main())
