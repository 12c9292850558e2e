"""``python -m vggt_trt.view OUT_DIR``: the vggt-view command."""

import sys

from ..cli.view import main

if __name__ == "__main__":
    sys.exit(main())
