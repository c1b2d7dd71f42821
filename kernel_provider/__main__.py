"""`python -m kernel_provider` is the `kernel-provider` command."""

import sys

from kernel_provider.cli import main

sys.exit(main())
