"""``python -m rwkvtune ...`` (and ``torchrun ... -m rwkvtune ...``): the same CLI as ``rwkvtune``."""

import sys

from rwkvtune.cli import main

if __name__ == "__main__":
    sys.exit(main())
