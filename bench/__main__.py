import sys

from .run import main

sys.exit(1 if main()["failed"] else 0)
