"""``python3 -m vioasid``: the same CLI as the ``vioasid`` console script."""

import sys

from vioasid.cli import main

sys.exit(main())
