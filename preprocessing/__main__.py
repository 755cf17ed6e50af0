"""``python -m preprocessing``: see :mod:`preprocessing.cli`."""

import sys

from preprocessing.cli import main

sys.exit(main())
