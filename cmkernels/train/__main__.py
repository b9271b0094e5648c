"""python -m cmkernels.train: the trainer's command line (see cmkernels.train)."""

import sys

from cmkernels.train import main

if __name__ == "__main__":
    sys.exit(main())
