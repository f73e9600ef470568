"""python -m vislora: the command line (also what torchrun runs for multi-process training)."""
import sys

from vislora.cli import main

sys.exit(main())
