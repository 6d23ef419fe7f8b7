"""`python -m fastcog ...` (what torchrun launches with -m)."""

import sys

from fastcog.cli import main

sys.exit(main())
