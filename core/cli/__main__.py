"""`python -m core.cli` runs the `voxq` command (what `make demo` and `make dev` use)."""

import sys

from core.cli import main

sys.exit(main())
