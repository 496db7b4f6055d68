"""``python -m dsv3`` (and ``torchrun -m dsv3``): the same commands as the ``dsv3`` script."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
