"""``python -m vggt_trt.view OUT_DIR``: the vggt-view command."""

import sys

from ..cli.view import main

sys.exit(main())
