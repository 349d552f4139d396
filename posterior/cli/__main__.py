"""``python -m posterior.cli ...``: the ``posterior`` command."""

import sys

from posterior.cli import main

sys.exit(main())
