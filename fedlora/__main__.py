"""``python -m fedlora``: the ``fedlora`` command (what tests and child runs call)."""

import sys

from fedlora.commands.cli import main

sys.exit(main())
