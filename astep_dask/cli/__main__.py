"""``python -m astep_dask.cli``: the ``astep-dask`` command."""

import sys

from astep_dask.cli import main

sys.exit(main())
