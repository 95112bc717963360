"""`python -m parathinker.demo --output docs/demo [--preset full|quick]`: see pipeline.py."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from parathinker.demo.pipeline import PRESETS, run_demo


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m parathinker.demo", description=__doc__)
    ap.add_argument("--output", default="docs/demo", help="report, plot and model go here")
    ap.add_argument("--preset", default="full", choices=sorted(PRESETS))
    args = ap.parse_args(argv)
    claims = run_demo(PRESETS[args.preset], Path(args.output))
    print(f"report: {Path(args.output) / 'README.md'}")
    for c in claims:
        print(("holds: " if c["holds"] else "DOES NOT HOLD: ") + c["claim"] + f" ({c['detail']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
