"""Check our VGGT against a reference fixture: ``python -m vggt_trt.cli.check_fixture PATH.safetensors``.

Exits 1 when any output's relative L2 error exceeds the tolerance, 2 on a bad fixture.
"""

from __future__ import annotations

import logging
import sys

from ..atomic import write_json_atomic
from ..errors import VggtTrtError
from ..model.check_fixture import DEFAULT_TOLERANCE, check_fixture, format_report
from .common import ArgumentParser

logger = logging.getLogger(__name__)


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m vggt_trt.cli.check_fixture", description=__doc__.splitlines()[0])
    parser.add_argument("fixture", help="fixture .safetensors file; its .json must sit beside it")
    parser.add_argument("--tolerance", type=float, default=DEFAULT_TOLERANCE, help="max relative L2 per output")
    parser.add_argument("--json", help="also write the report as JSON to this path")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        report = check_fixture(args.fixture, args.tolerance)
    except VggtTrtError as e:
        logger.error("%s", e)
        return 2
    sys.stdout.write(format_report(report) + "\n")
    if args.json:
        write_json_atomic(args.json, report)
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
