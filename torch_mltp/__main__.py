"""``python -m torch_mltp``: the experiments command line (same as ``torch-mltp``)."""

import sys

from torch_mltp.experiments.cli import main

sys.exit(main())
