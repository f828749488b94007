"""`python -m crosslogic …`: the same command line as the `crosslogic` script (child processes use it)."""

import sys

from crosslogic.commands import main

sys.exit(main())
