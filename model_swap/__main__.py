"""`python -m model_swap`: the model-swap command line."""

import sys

from model_swap.commands import main

sys.exit(main())
