"""``python -m peftlab ...``: the ``peftlab`` command (see :mod:`peftlab.cli`)."""

import sys

from peftlab.cli import main

if __name__ == "__main__":
    sys.exit(main())
