"""`python -m vhack.cli`: the `vhack` command."""

import sys

from vhack.cli import main

sys.exit(main())
