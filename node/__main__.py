"""``python -m fleetpipe.node`` runs a node daemon."""

import sys

from fleetpipe.node.cli import main

sys.exit(main())
