"""``python -m minigpt`` runs the command line (needed under ``torchrun -m minigpt``)."""

import sys

from minigpt.cli import main

sys.exit(main())
