from __future__ import annotations

import sys

from nomaflowd.cli import main

sys.exit(main())
