"""`python -m dskc` is the `dskc` command."""
import sys

from dskc.cli import main

sys.exit(main())
