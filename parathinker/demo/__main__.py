"""The CPU demo: train a tiny ParaThinker from scratch on a task where thinking wider helps, then
show its accuracy rising with the number of paths.

Every step is one of the project's own commands (a scripted teacher writes the SFT data, then
`parathinker train`, then `parathinker eval` at P = 1, 2, 4, 8), printed before it runs. Offline,
CPU only, on one thread (`DemoConfig.threads`: the numbers do not depend on the core count); the
report says how long its training took. The output directory gets
README.md (the report: numbers, plot, and whether each claim holds), model/ (the trained
checkpoint, usable with every command: `parathinker generate --model DIR/model ...`) and work/
(data, checkpoints, eval samples).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from parathinker.demo.pipeline import PRESETS, run_demo
from parathinker.extras import exits_for_missing_extra

PRESET_HELP = {"full": "the committed run (4 eval samples per problem)",
               "quick": "the same training, half the eval samples (the slow test's run)"}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m parathinker.demo", description=__doc__, allow_abbrev=False,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--output", default="docs/demo",
                    help="directory for the report (README.md), the plot, model/ and work/; "
                         "the trained model replaces a model/ already there (default: %(default)s)")
    ap.add_argument("--preset", default="full", choices=sorted(PRESETS),
                    help="; ".join(f"{k}: {v}" for k, v in PRESET_HELP.items()) + " (default: %(default)s)")
    args = ap.parse_args(argv)
    if exits_for_missing_extra("demo", args):
        return 2
    claims = run_demo(PRESETS[args.preset], Path(args.output))
    print(f"report: {Path(args.output) / 'README.md'}")
    for c in claims:
        print(("holds: " if c["holds"] else "DOES NOT HOLD: ") + c["claim"] + f" ({c['detail']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
