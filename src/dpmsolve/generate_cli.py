"""``dpmsolve generate``: one image per seed, on one process or many (``torchrun``), resumable.

The same command line runs on one process (``dpmsolve generate ...``, ``python -m dpmsolve generate ...``) and on
many (``torchrun --nproc_per_node N -m dpmsolve generate ...``), and gives the same files. See
:mod:`dpmsolve.generate` for how (per-seed noise, per-sample solver noise, fixed network slices) and
``docs/generate.md`` for the guide. This module imports torch only when a command runs.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from .cli import UsageError, at_least, check_out_dir, require

__all__ = ["EXAMPLES", "add_arguments", "run_from_args"]

EXAMPLES = """examples:
    dpmsolve generate --model digits --guidance 3 --solver dpmsolver++ --steps 8 --seeds 0-9999 --batch 64 --out DIR
    torchrun --nproc_per_node 2 -m dpmsolve generate --model digits --seeds 0-9999 --out DIR
    dpmsolve generate --network mypackage.models:denoiser --shape 3,32,32 --seeds 0-49999 --out DIR
    dpmsolve generate --model patches --plan patches-8nfe.plan.json --format npz --out DIR
    dpmsolve evaluate DIR                  # then score them (digits-FD, class accuracy, patches distance)"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``dpmsolve generate``."""
    what = parser.add_argument_group("what to sample (one of)")
    what.add_argument("--model", default=None,
                      help="a shipped model: digits, digits-flow or patches; or the folder of an unconditional "
                           "diffusers pixel pipeline saved with save_pretrained (unet + scheduler)")
    what.add_argument("--network", default=None, metavar="MODULE:FUNCTION",
                      help="a network of your own: a function (module:function or file.py:function) without "
                           "arguments that returns a dpmsolve Denoiser (dpmsolve.wrap_model(...)); needs --shape")
    what.add_argument("--shape", default=None, metavar="C,H,W", help="--network only: the shape of one sample")
    how = parser.add_argument_group("how")
    how.add_argument("--solver", default=None,
                     help="solver name (default dpmsolver++; stochastic solvers get per-sample noise)")
    how.add_argument("--order", type=int, default=None, help="solver order (default 2 where it has one)")
    how.add_argument("--steps", type=int, default=None, help="model evaluations (default 20)")
    how.add_argument("--grid", default=None, help="time grid: logSNR (default), time_uniform, karras, ...")
    how.add_argument("--final", choices=["zero", "min"], default=None,
                     help="end the grid at sigma = 0 (default) or at the schedule's t_min")
    how.add_argument("--plan", default=None, metavar="FILE",
                     help="a tuned plan file instead of --solver/--order/--steps/--grid/--final")
    how.add_argument("--guidance", type=float, default=None,
                     help="classifier-free guidance scale of a class-conditional shipped model (default 3)")
    how.add_argument("--class", dest="classes", default=None, metavar="LABELS",
                     help="class labels, e.g. 3 or 0,1,2: seed s gets LABELS[s %% count] (default: all classes)")
    run = parser.add_argument_group("seeds and output")
    run.add_argument("--seeds", default="0-63", help="seeds, one image each: 0-9999 or 0,5,10-19")
    run.add_argument("--batch", type=int, default=64,
                     help="images per process sampled together (does not change the images)")
    run.add_argument("--eval-batch", type=int, default=32, metavar="N",
                     help="samples per network call, padded: fixes the rounding, so it is a setting of the output "
                          "(changing it changes the last bits)")
    run.add_argument("--format", dest="fmt", choices=["png", "npz"], default="png",
                     help="png: one file per seed (SEED.png); npz: one shard per batch + float samples")
    run.add_argument("--upscale", type=int, default=1, metavar="N",
                     help="each pixel becomes N x N image pixels (nearest neighbour)")
    run.add_argument("--device", default=None,
                     help="torch device (default cuda:LOCAL_RANK where CUDA is available, else cpu)")
    run.add_argument("--out", default="dpmsolve-generated", help="the output folder (shared by all processes)")
    run.add_argument("--overwrite", action="store_true",
                     help="delete the images of an earlier run with other settings in --out and start over")
    run.add_argument("--timeout", type=float, default=1800.0, metavar="SECONDS",
                     help="how long a process waits for the others before giving up")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")


def _ints(option: str, text: str, what: str) -> list[int]:
    try:
        values = [int(v) for v in text.replace(" ", "").split(",")]
    except ValueError:
        raise UsageError(f"{option} must be {what}, got {text!r}.") from None
    return values


def run_from_args(args: argparse.Namespace) -> int:
    """Run ``dpmsolve generate`` for parsed ``args`` (on every rank of a distributed run)."""
    from .generate import RankFailure, generate, parse_seeds

    if (args.model is None) == (args.network is None):
        raise UsageError("say what to sample: --model NAME (digits, digits-flow, patches, or a diffusers pipeline "
                         "folder) or --network MODULE:FUNCTION, not both.")
    if args.plan is not None:
        given = [f"--{n}" for n in ("solver", "order", "steps", "grid", "final") if getattr(args, n) is not None]
        if given:
            raise UsageError(f"--plan holds its own times and step settings: give no {' / '.join(given)} with it.")
    if args.shape is not None and args.network is None:
        raise UsageError("--shape applies to --network only (a shipped model knows its shape).")
    for option, value in (("--steps", args.steps), ("--batch", args.batch), ("--eval-batch", args.eval_batch),
                          ("--upscale", args.upscale), ("--order", args.order)):
        if value is not None:
            at_least(option, value, 1)
    if not args.timeout > 0:
        raise UsageError(f"--timeout must be > 0 seconds, got {args.timeout}.")
    try:
        parse_seeds(args.seeds)
    except (TypeError, ValueError) as exc:
        raise UsageError(f"--seeds: {exc}") from None
    shape = None if args.shape is None else _ints("--shape", args.shape, "C,H,W (positive integers)")
    classes = None if args.classes is None else _ints("--class", args.classes, "class labels such as 3 or 0,1,2")
    check_out_dir(args.out)
    if args.fmt == "png":
        require("PIL", "writing PNG images", "pip install pillow (or pass --format npz)")
    model = args.model if args.model is not None else args.network
    if args.model is not None and ":" in args.model and not Path(args.model).exists():
        raise UsageError(f"--model {args.model}: a network of your own goes in --network MODULE:FUNCTION.")
    if args.network is not None and ":" not in args.network:
        raise UsageError(f"--network must be MODULE:FUNCTION or FILE.py:FUNCTION, got {args.network!r}.")
    if args.batch < args.eval_batch and _rank() == 0:
        print(f"note: --batch {args.batch} is below --eval-batch {args.eval_batch}: every network call is padded to "
              f"{args.eval_batch} samples (raise --batch, or lower --eval-batch, which changes the output's last "
              "bits)", file=sys.stderr)
    try:
        result = generate(model, args.seeds, args.out, solver=args.solver or "dpmsolver++", order=args.order,
                          steps=20 if args.steps is None else args.steps, grid=args.grid or "logSNR",
                          final=args.final or "zero", plan=args.plan, guidance=args.guidance, classes=classes,
                          shape=shape, batch=args.batch, eval_batch=args.eval_batch, fmt=args.fmt,
                          upscale=args.upscale, device=args.device, overwrite=args.overwrite,
                          progress=False if args.no_progress else None, timeout=args.timeout)
    except RankFailure as exc:
        print(f"dpmsolve: error: {' '.join(str(exc).split())}", file=sys.stderr)
        raise SystemExit(1) from None
    except (ValueError, TypeError) as exc:
        raise UsageError(str(exc)) from None
    if _rank() == 0:
        if result.written == 0:
            print(f"All {result.requested} seeds ({args.seeds}) are already in {result.out}/: nothing to do.")
        else:
            done = f" ({result.already_done} were already there)" if result.already_done else ""
            print(f"Wrote {result.written} of {result.requested} images{done} to {result.out}/ in "
                  f"{result.seconds:.1f} s: {result.images_per_second:.1f} images/s on {result.world_size} "
                  f"process{'es' if result.world_size > 1 else ''}.")
    return 0


def _rank() -> int:
    import os

    return int(os.environ.get("RANK", "0") or 0)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m dpmsolve.generate_cli`` = ``dpmsolve generate``."""
    from .cli import main as cli_main

    return cli_main(["generate", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
