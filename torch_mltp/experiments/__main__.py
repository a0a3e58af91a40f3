"""``python -m torch_mltp.experiments`` runs the ``torch-mltp`` command line."""

import sys

from .cli import main

sys.exit(main())
