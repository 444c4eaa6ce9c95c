"""``python -m fleetpipe`` runs the ``fleetpipe`` command."""

import sys

from fleetpipe.cli import main

sys.exit(main())
