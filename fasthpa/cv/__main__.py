"""``python -m fasthpa.cv`` and ``torchrun ... -m fasthpa.cv``."""

import sys

from fasthpa.cv.cli import main

sys.exit(main())
