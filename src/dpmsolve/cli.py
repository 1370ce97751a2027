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
    demo.add_argument("--patches", type=int, default=20, help="samples of the patches model (default 20)")
    demo.add_argument("--no-plot", action="store_true", help="print the table only")
    bench = commands.add_parser("bench", help="error vs NFE of our solvers and the peers on the lab's problems")
    bench.add_argument("--problems", nargs="+", default=None,
                       help="gaussian, mixture-cfg7.5, digits-kde (default: all)")
    bench.add_argument("--nfes", nargs="+", type=int, default=[5, 6, 8, 10, 12, 15, 20])
    bench.add_argument("--samples", type=int, default=64, help="start noises per problem (default 64)")
    bench.add_argument("--endpoint", choices=["zero", "t_min"], default="zero",
                       help="compare at sigma = 0 (default) or at the schedule's t_min")
    bench.add_argument("--no-peers", action="store_true", help="only our solvers (skip diffusers / k-diffusion)")
    bench.add_argument("--zoo", nargs="*", default=None, metavar="MODEL",
                       help="also measure the shipped models (digits, digits-flow, patches; no names: all three) "
                            "against cached high-accuracy references")
    bench.add_argument("--zoo-samples", type=int, default=16, help="start noises per zoo model (default 16)")
    bench.add_argument("--out", default="dpmsolve-bench", help="folder for accuracy.md/.json/.png")
    from .sample_cli import add_arguments as add_sample_arguments

    sample = commands.add_parser("sample", help="sample images from a saved diffusers pipeline with a dpmsolve solver")
    add_sample_arguments(sample)
    args = parser.parse_args(argv)
    if args.command == "sample":
        from .sample_cli import run_from_args

        return run_from_args(args, sample)
    if args.command == "bench":
        from .lab.bench import run_bench

        if args.samples < 1 or min(args.nfes) < 2:
            parser.error("--samples must be >= 1 and every NFE >= 2")
        zoo = None if args.zoo is None else (args.zoo or [name for name, _ in _zoo_problems()])
        report = run_bench(args.problems, args.nfes, args.samples, args.endpoint, not args.no_peers, args.out,
                           zoo=zoo or (), zoo_samples=args.zoo_samples)
        for problem in report.problems():
            print(report.to_markdown(problem) + "\n")
        print(f"Wrote {args.out}/accuracy.md, accuracy.json and accuracy.png")
    if args.command == "demo":
        from .demo import main as demo_main

        if args.samples < 1 or args.patches < 2:
            parser.error("--samples must be >= 1 and --patches >= 2")
        demo_main(out=args.out, n=args.samples, plot=not args.no_plot, patches=args.patches)
    return 0


def _zoo_problems():
    from .lab.neural import ZOO_PROBLEMS

    return ZOO_PROBLEMS


if __name__ == "__main__":
    sys.exit(main())
