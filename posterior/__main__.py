"""``python -m posterior ...``: the ``posterior`` command."""

import sys

from posterior.cli import main

sys.exit(main())
