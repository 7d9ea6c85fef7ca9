"""``python -m forkserver``: the same as the ``forkserver`` command."""

import sys

from forkserver.cli import main

sys.exit(main())
