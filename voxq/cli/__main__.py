"""`python -m voxq.cli` runs the `voxq` command (what `make demo` and `make dev` use)."""

import sys

from voxq.cli import main

sys.exit(main())
