"""`python -m longvila_engine.dryrun`: the command line of report.py."""
import sys

from .report import main

sys.exit(main())
