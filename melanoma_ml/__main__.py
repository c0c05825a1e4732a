"""``python -m melanoma_ml``: the ``melanoma-ml`` command line (see ``melanoma_ml.cli``)."""

import sys

from melanoma_ml.cli import main

sys.exit(main())
