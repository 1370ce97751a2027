"""The ``dpmsolve`` command line (also ``python -m dpmsolve``).

A problem the user can fix (bad arguments, a path that cannot be read or written, a damaged plan or statistics
file, a missing optional dependency, an unavailable device, a sample that turned NaN) is reported as one line,
``dpmsolve: error: ...``, with exit status 2 (arguments) or 1 (anything else); only unexpected internal errors
show a traceback. Third-party deprecation and config warnings are silenced while a command runs.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import os
import sys
import textwrap
import time
from pathlib import Path

from . import __version__

# An optional module -> (its distribution name, what to install).
OPTIONAL = {
    "matplotlib": ("matplotlib", 'pip install "dpmsolve[plot]"'),
    "sklearn": ("scikit-learn", 'pip install "dpmsolve[lab]"'),
    "diffusers": ("diffusers", 'pip install "dpmsolve[lab]"'),
    "PIL": ("Pillow", "pip install pillow"),
    "transformers": ("transformers", "pip install transformers"),
    "k_diffusion": ("k-diffusion", "pip install k-diffusion"),
}


class UsageError(ValueError):
    """Bad arguments: reported as one line with exit status 2."""


class MissingDependency(ImportError):
    """An optional dependency that a command needs is not installed."""


def at_least(option: str, values, minimum: int) -> None:
    """Raise :class:`UsageError` naming ``option`` and the value given when a value is below ``minimum``."""
    bad = [v for v in (values if isinstance(values, (list, tuple)) else [values]) if v < minimum]
    if bad:
        raise UsageError(f"{option} must be >= {minimum}, got {bad[0]}.")


def missing_message(module: str, needed_for: str, install: str | None = None) -> str:
    """``"{needed_for} needs {package}, which is not installed: {install}"``."""
    package, default = OPTIONAL.get(module, (module, f"pip install {module}"))
    return f"{needed_for} needs {package}, which is not installed: {install or default}"


def require(module: str, needed_for: str, install: str | None = None) -> None:
    """Raise :class:`MissingDependency` (before any computing) when ``module`` cannot be imported."""
    try:
        found = importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):   # ValueError: a module in sys.modules without a spec
        found = False
    if not found:
        raise MissingDependency(missing_message(module, needed_for, install))


def check_out_dir(path, option: str = "--out") -> None:
    """Fail before any computing when ``path`` cannot be (or become) a writable folder; creates nothing."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UsageError(f"{option} {path}: is a file, not a folder.")
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise UsageError(f"{option} {path}: cannot create the folder, {existing} is a file.")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UsageError(f"{option} {path}: {existing} is not writable.")


@contextlib.contextmanager
def quiet_third_party():
    """Hide the deprecation/config warnings of diffusers, transformers and friends (nothing a user of the
    command can act on) inside the block: Python warnings filters plus the libraries' logging verbosity."""
    import logging
    import warnings

    names = ("diffusers", "transformers")
    env = {f"{n.upper()}_VERBOSITY": os.environ.get(f"{n.upper()}_VERBOSITY") for n in names}
    levels = {n: logging.getLogger(n).level for n in names}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", module=r"(diffusers|transformers|huggingface_hub|k_diffusion|torchsde)\b")
        os.environ.update({key: "error" for key in env})   # read by the libraries when first imported
        for n in names:
            logging.getLogger(n).setLevel(logging.ERROR)
        try:
            yield
        finally:
            for key, value in env.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
            for n, level in levels.items():
                logging.getLogger(n).setLevel(level)


def _user_error(exc: BaseException) -> tuple[str, int] | None:
    """``(one-line message, exit status)`` for an error the user can fix; None for an internal error."""
    import torch

    if isinstance(exc, MissingDependency):
        return str(exc), 1
    if isinstance(exc, ModuleNotFoundError):
        top = (exc.name or "").split(".")[0]
        return (missing_message(top, "this command"), 1) if top in OPTIONAL else None
    if isinstance(exc, UsageError):
        return " ".join(str(exc).split()), 2
    if isinstance(exc, (ValueError, OSError, FloatingPointError, MemoryError, torch.cuda.OutOfMemoryError)):
        return " ".join(str(exc).split()) or type(exc).__name__, 1
    return None


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Shows defaults, except None/False ones and where the help already says the default."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    """The parser of the ``dpmsolve`` command and its sub-commands."""
    from .evaluate_cli import EXAMPLES as EVALUATE_EXAMPLES, add_arguments as add_evaluate_arguments
    from .generate_cli import EXAMPLES as GENERATE_EXAMPLES, add_arguments as add_generate_arguments
    from .sample_cli import EXAMPLES as SAMPLE_EXAMPLES, add_arguments as add_sample_arguments

    parser = argparse.ArgumentParser(prog="dpmsolve", description="Fast samplers for diffusion and flow models.",
                                     formatter_class=_Formatter)
    parser.add_argument("--version", action="version", version=f"dpmsolve {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name, help, description=None, **kwargs):
        description = textwrap.fill(description or help[0].upper() + help[1:] + ".", 79)
        return commands.add_parser(name, help=help, description=description, formatter_class=_Formatter, **kwargs)

    demo = command("demo", "compare solvers on the shipped models and a Gaussian mixture against a reference "
                           "solution (about 2 minutes on a CPU)")
    demo.add_argument("--out", default="dpmsolve-demo", help="folder for the PNGs")
    demo.add_argument("--mixture-samples", "--samples", dest="mixture_samples", type=int, default=1000,
                      metavar="N", help="samples drawn from the analytic 8-mode Gaussian mixture (the digits model "
                                        "always draws 20 images)")
    demo.add_argument("--patches", type=int, default=20, metavar="N", help="samples drawn from the patches model")
    demo.add_argument("--no-plot", action="store_true", help="print the tables only (no matplotlib needed)")

    bench = command("bench", "error vs NFE of our solvers and the peers on the lab's problems")
    bench.add_argument("--problems", nargs="+", default=None,
                       help="gaussian, mixture-cfg7.5, digits-kde (default: all)")
    bench.add_argument("--nfes", nargs="+", type=int, default=[5, 6, 8, 10, 12, 15, 20])
    bench.add_argument("--samples", type=int, default=64, help="start noises per problem")
    bench.add_argument("--endpoint", choices=["zero", "t_min"], default="zero",
                       help="compare at sigma = 0 or at the schedule's t_min")
    bench.add_argument("--no-peers", action="store_true", help="only our solvers (skip diffusers / k-diffusion)")
    bench.add_argument("--zoo", nargs="*", default=None, metavar="MODEL",
                       help="also measure the shipped models (digits, digits-flow, patches; no names: all three) "
                            "against cached high-accuracy references")
    bench.add_argument("--zoo-samples", type=int, default=16, help="start noises per zoo model")
    bench.add_argument("--out", default="dpmsolve-bench", help="folder for accuracy.md/.json/.png")

    tune = command("tune", "tune sampling plans (solver and time steps) for a shipped model",
                   description="Search the solver settings and time steps of a shipped model for each NFE "
                               "(dpmsolve.tune) and save one plan file per NFE.")
    tune.add_argument("--model", required=True, help="a shipped model: digits, digits-flow or patches")
    tune.add_argument("--nfe", nargs="+", type=int, default=[5, 6, 8, 10], help="step budgets")
    tune.add_argument("--guidance", type=float, default=None,
                      help="classifier-free guidance scale of class-conditional models (default 3)")
    tune.add_argument("--samples", type=int, default=None,
                      help="tuning start noises, a quarter held out (default 128)")
    tune.add_argument("--seed", type=int, default=12345, help="seed of the start noises")
    tune.add_argument("--endpoint", choices=["zero", "t_min"], default="zero",
                      help="tune the sample at sigma = 0 or at the schedule's t_min")
    tune.add_argument("--budget", type=int, default=None,
                      help="batched model calls the search may spend per NFE (default 150 x NFE)")
    tune.add_argument("--out", default="dpmsolve-plans", help="folder for the plan files")

    sample = command("sample", "sample images from a shipped model (--model digits) or from a diffusers "
                               "pipeline saved on disk, with a dpmsolve solver",
                     epilog=SAMPLE_EXAMPLES)
    add_sample_arguments(sample)

    generate = command("generate", "one image per seed (for FID-style evaluation), on one process or many "
                                   "(torchrun --nproc_per_node N -m dpmsolve generate ...); the same files either way, "
                                   "resumable", epilog=GENERATE_EXAMPLES)
    add_generate_arguments(generate)
    evaluate = command("evaluate", "score a folder written by dpmsolve generate with the shipped models' metrics "
                                   "(digits-FD, class accuracy, patches distance), streaming", epilog=EVALUATE_EXAMPLES)
    add_evaluate_arguments(evaluate)
    return parser


def main(argv=None) -> int:
    """Run the ``dpmsolve`` command; user errors exit (SystemExit) with one line on stderr."""
    args = build_parser().parse_args(argv)
    try:
        with quiet_third_party():
            return _COMMANDS[args.command](args)
    except KeyboardInterrupt:
        print("dpmsolve: interrupted", file=sys.stderr)
        raise SystemExit(130) from None
    except Exception as exc:
        found = _user_error(exc)
        if found is None:
            raise
        print(f"dpmsolve: error: {found[0]}", file=sys.stderr)
        raise SystemExit(found[1]) from None


def _sample(args) -> int:
    from .sample_cli import run_from_args

    return run_from_args(args)


def _demo(args) -> int:
    from .demo import main as demo_main

    at_least("--mixture-samples", args.mixture_samples, 1)
    at_least("--patches", args.patches, 2)
    install = 'pip install "dpmsolve[lab]"'
    require("sklearn", "dpmsolve demo (it scores the samples against scikit-learn's digits and photos)", install)
    if not args.no_plot:
        require("matplotlib", "dpmsolve demo's plots", install + " (or pass --no-plot)")
        check_out_dir(args.out)
    demo_main(out=args.out, n=args.mixture_samples, plot=not args.no_plot, patches=args.patches)
    return 0


def _bench(args) -> int:
    from .lab.bench import run_bench

    at_least("--samples", args.samples, 1)
    at_least("--zoo-samples", args.zoo_samples, 1)
    at_least("--nfes", args.nfes, 2)
    if args.problems is None or "digits-kde" in args.problems:
        require("sklearn", "the digits-kde problem", 'pip install "dpmsolve[lab]" (or pass --problems gaussian '
                                                     "mixture-cfg7.5)")
    check_out_dir(args.out)
    start = time.perf_counter()
    zoo = None if args.zoo is None else (args.zoo or [name for name, _ in _zoo_problems()])
    written: list[Path] = []
    report = run_bench(args.problems, args.nfes, args.samples, args.endpoint, not args.no_peers, args.out,
                       zoo=zoo or (), zoo_samples=args.zoo_samples, written=written)
    for problem in report.problems():
        print(report.to_markdown(problem) + "\n")
    print(f"Wrote {', '.join(str(p) for p in written)} in {time.perf_counter() - start:.0f} s")
    if not any(p.suffix == ".png" for p in written):
        print("(no plot: " + missing_message("matplotlib", "accuracy.png") + ")")
    return 0


def _tune(args) -> int:
    from .zoo import MODELS
    from .zoo.plans import GUIDANCE, plan_path, tune_model

    if args.model not in MODELS:
        raise UsageError(f"--model must be one of {', '.join(MODELS)} (got {args.model!r}); tune your own model "
                         "in Python with dpmsolve.tune(denoiser, noise, nfe).")
    at_least("--nfe", args.nfe, 2)
    if args.samples is not None:
        at_least("--samples", args.samples, 8)
    if GUIDANCE[args.model] is None and args.guidance is not None:
        raise UsageError(f"{args.model} is unconditional: it takes no --guidance.")
    check_out_dir(args.out)
    start = time.perf_counter()
    guidance = args.guidance if args.guidance is not None else GUIDANCE[args.model]
    options = {} if args.budget is None else {"budget": args.budget}
    plans = tune_model(args.model, args.nfe, guidance, args.samples, args.seed, progress=True,
                       endpoint=args.endpoint, **options)
    for k, plan in plans.items():
        path = plan.save(Path(args.out) / plan_path(args.model, k, guidance).name)
        print(plan.report() + f"\n-> {path}\n")
    print(f"Done in {time.perf_counter() - start:.0f} s")
    return 0


def _generate(args) -> int:
    from .generate_cli import run_from_args

    return run_from_args(args)


def _evaluate(args) -> int:
    from .evaluate_cli import run_from_args

    return run_from_args(args)


_COMMANDS = {"sample": _sample, "demo": _demo, "bench": _bench, "tune": _tune, "generate": _generate,
             "evaluate": _evaluate}


def _zoo_problems():
    from .lab.neural import ZOO_PROBLEMS

    return ZOO_PROBLEMS


if __name__ == "__main__":
    sys.exit(main())
