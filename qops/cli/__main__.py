"""``python -m qops.cli``: the same as the ``qops`` command."""

import sys

from qops.cli import main

sys.exit(main())
