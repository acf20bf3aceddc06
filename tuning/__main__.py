"""``python -m tuning --config FILE.yaml [...]``: run or resume a tuning study."""

import sys

from .cli import main

sys.exit(main())
