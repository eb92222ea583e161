"""`python -m devcluster`: see devcluster.cli."""

import sys

from devcluster.cli import main

sys.exit(main())
