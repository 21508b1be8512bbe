"""python -m serving.archive: the archive restoration job's command line."""

import sys

from serving.archive.job import main

sys.exit(main())
