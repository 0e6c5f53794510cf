"""``python -m fasthpa.predict`` and ``torchrun ... -m fasthpa.predict``."""

import sys

from fasthpa.predict.cli import main

sys.exit(main())
