"""``python -m gateway.cli``: the same as ``drgw``."""

import sys

from gateway.cli.main import main

if __name__ == "__main__":  # not again in a process that multiprocessing spawns
    sys.exit(main())
