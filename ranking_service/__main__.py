"""`python -m ranking_service --data-dir D --port P [--workers N]`."""

import sys

from ranking_service.runner import main

sys.exit(main())
