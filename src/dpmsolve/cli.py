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
    tune = commands.add_parser("tune", help="tune sampling plans (solver and time steps) for a shipped model",
                               description="Search the solver settings and time steps of a shipped model for each "
                                           "NFE (dpmsolve.tune) and save one plan file per NFE.")
    tune.add_argument("--model", required=True, help="a shipped model: digits, digits-flow or patches")
    tune.add_argument("--nfe", nargs="+", type=int, default=[5, 6, 8, 10], help="step budgets (default 5 6 8 10)")
    tune.add_argument("--guidance", type=float, default=None,
                      help="classifier-free guidance scale of class-conditional models (default 3)")
    tune.add_argument("--samples", type=int, default=None,
                      help="tuning start noises, a quarter held out (default 128; patches 64)")
    tune.add_argument("--seed", type=int, default=12345, help="seed of the start noises (default 12345)")
    tune.add_argument("--endpoint", choices=["zero", "t_min"], default="zero",
                      help="tune the sample at sigma = 0 (default) or at the schedule's t_min")
    tune.add_argument("--budget", type=int, default=None,
                      help="batched model calls the search may spend per NFE (default 150 x NFE)")
    tune.add_argument("--out", default="dpmsolve-plans", help="folder for the plan files (default ./dpmsolve-plans)")
    from .sample_cli import add_arguments as add_sample_arguments

    sample = commands.add_parser("sample", help="sample images from a saved diffusers pipeline with a dpmsolve solver")
    add_sample_arguments(sample)
    args = parser.parse_args(argv)
    if args.command == "sample":
        from .sample_cli import run_from_args

        return run_from_args(args, sample)
    if args.command == "tune":
        return _tune(parser, args)
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


def _tune(parser, args) -> int:
    from pathlib import Path

    from .zoo import MODELS
    from .zoo.plans import GUIDANCE, plan_path, tune_model

    if args.model not in MODELS:
        parser.error(f"--model must be one of {', '.join(MODELS)} (got {args.model!r}); tune your own model in "
                     "Python with dpmsolve.tune(denoiser, noise, nfe).")
    if min(args.nfe) < 2 or (args.samples is not None and args.samples < 8):
        parser.error("every --nfe must be >= 2 and --samples >= 8")
    guidance = args.guidance if args.guidance is not None else GUIDANCE[args.model]
    if GUIDANCE[args.model] is None and args.guidance is not None:
        parser.error(f"{args.model} is unconditional: it takes no --guidance")
    options = {} if args.budget is None else {"budget": args.budget}
    plans = tune_model(args.model, args.nfe, guidance, args.samples, args.seed, progress=True,
                       endpoint=args.endpoint, **options)
    for k, plan in plans.items():
        path = plan.save(Path(args.out) / plan_path(args.model, k, guidance).name)
        print(plan.report() + f"\n-> {path}\n")
    return 0


def _zoo_problems():
    from .lab.neural import ZOO_PROBLEMS

    return ZOO_PROBLEMS


if __name__ == "__main__":
    sys.exit(main())
