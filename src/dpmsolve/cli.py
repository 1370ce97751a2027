"""The ``dpmsolve`` command line."""

from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="dpmsolve", description="Fast samplers for diffusion and flow models.")
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="compare solvers on a model against the exact ODE solution")
    demo.add_argument("--out", default="dpmsolve-demo", help="folder for the PNG (default: ./dpmsolve-demo)")
    demo.add_argument("--samples", type=int, default=1000, help="number of samples (default 1000)")
    demo.add_argument("--no-plot", action="store_true", help="print the table only")
    args = parser.parse_args(argv)
    if args.command == "demo":
        from .demo import main as demo_main

        if args.samples < 1:
            parser.error("--samples must be >= 1")
        demo_main(out=args.out, n=args.samples, plot=not args.no_plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
