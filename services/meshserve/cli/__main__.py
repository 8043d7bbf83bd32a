"""`python -m meshserve.cli ...`: how `meshserve up` and the tests start each service as a process."""

import sys

from meshserve.cli.main import main

sys.exit(main())
