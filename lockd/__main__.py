"""``python -m lockd`` runs the command line."""

import sys

from lockd.cli import main

sys.exit(main())
