"""``python -m fasthpa.train`` and ``torchrun ... -m fasthpa.train``."""

import sys

from fasthpa.train.cli import main

sys.exit(main())
