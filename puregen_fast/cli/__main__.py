"""``python -m puregen_fast.cli`` (what ``torchrun -m`` runs)."""

import sys

from puregen_fast.cli.main import main

sys.exit(main())
