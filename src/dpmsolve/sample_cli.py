"""``dpmsolve sample``: images from a shipped model or a diffusers pipeline saved on disk, sampled by a dpmsolve
solver.

``--model NAME`` samples a model shipped with dpmsolve (:mod:`dpmsolve.zoo`) with ``dp.sample`` and writes each
sample as a PNG upscaled ``--upscale`` times (default 4: the 8x8 digits become 32x32 images).

A pipeline is loaded offline with ``DiffusionPipeline.from_pretrained(PIPELINE_DIR)``; its scheduler is replaced
by :class:`~dpmsolve.integrations.diffusers.DPMSolveScheduler` built from the pipeline's own scheduler config (so
the model's noise schedule and prediction type are kept) with the chosen solver, grid and end; the pipeline then
runs as usual (with its own progress bar) and every image is written as a PNG.

Unconditional pipelines (those whose ``__call__`` takes ``batch_size``, e.g. ``DDPMPipeline``) take no prompt;
text-to-image pipelines (those taking ``prompt``) need ``--prompt`` and use ``--guidance``.

``--plan FILE`` samples with a tuned :class:`~dpmsolve.Plan` (``dpmsolve.tune``, ``plan.save``) instead of
``--solver``/``--order``/``--grid``/``--steps``/``--final`` (the plan holds its times, step settings and end; giving
any of them with it is an error): the scheduler's ``plan`` for a pipeline, ``dp.sample(denoiser, x, plan)`` for
``--model``. The plan is checked against the model's schedule and sample shape (and, for ``--model``, the model).

This module imports torch and diffusers only when a command runs, so ``dpmsolve --help`` stays fast.
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import math
import sys
from pathlib import Path
from typing import Any, Sequence

from .cli import UsageError, at_least, check_out_dir, require

__all__ = ["SampleError", "add_arguments", "run_from_args", "sample_pipeline", "sample_zoo", "NO_PIPELINE_MESSAGE"]

EXAMPLES = """examples:
    dpmsolve sample --model digits --guidance 3 --steps 10
    dpmsolve sample ./my-ddpm-pipeline --steps 20 --out samples
    dpmsolve sample --model digits --plan digits-8nfe.plan.json"""

NO_PIPELINE_MESSAGE = (
    "dpmsolve sample: say what to sample: a model shipped with dpmsolve (--model digits) or the directory of a "
    "diffusers pipeline saved with save_pretrained, e.g.\n" + EXAMPLES.split("\n", 1)[1])


class SampleError(UsageError):
    """A problem with the arguments or the pipeline directory, reported to the user without a traceback."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``dpmsolve sample``."""
    parser.add_argument("pipeline_dir", nargs="?", default=None, metavar="PIPELINE_DIR",
                        help="a diffusers pipeline saved on disk (save_pretrained; loaded offline)")
    parser.add_argument("--model", default=None,
                        help="a model shipped with dpmsolve instead of a pipeline: digits, digits-flow, patches "
                             "(PNGs upscaled --upscale times)")
    parser.add_argument("--upscale", type=int, default=4, metavar="N",
                        help="--model only: each sample pixel becomes N x N PNG pixels (nearest neighbour; "
                             "1 = the model's resolution)")
    parser.add_argument("--label", type=int, default=None,
                        help="class label for a class-conditional --model (default: cycle through the classes)")
    parser.add_argument("--solver", default=None,
                        help="dpmsolve solver (registry name): ddim, dpmsolver, dpmsolver++, sde-dpmsolver++, unipc, "
                             "dpmsolver-v3 (--model only: it uses the statistics shipped with the model), euler, heun, "
                             "dpm2, deis, pndm, plms, ipndm, ipndm_v, lms, res-multistep, gradient-estimation, and "
                             "the stochastic euler-ancestral, dpm2-ancestral, dpmpp-2s-ancestral, dpmpp-sde, "
                             "dpmpp-2m-sde, dpmpp-3m-sde, er-sde, sa-solver (default dpmsolver++). ComfyUI names "
                             "such as dpmpp_2m_karras are presets of the Python API (dpmsolve.presets): give their "
                             "solver here and the scheduler as --grid")
    parser.add_argument("--order", type=int, default=None,
                        help="solver order (default 2; ddim has no order option)")
    parser.add_argument("--grid", default=None,
                        help="time grid: logSNR, time_uniform, time_quadratic, time_power, karras, exponential, "
                             "flow_shift; ComfyUI's schedulers simple, sgm_uniform, normal, ddim_uniform, beta, "
                             "linear_quadratic, kl_optimal; diffusers' spacings leading, linspace, trailing and "
                             "beta_sigmas; the published tables ays, gits (default logSNR; flow_shift for "
                             "flow-matching pipelines)")
    parser.add_argument("--steps", type=int, default=None, help="model evaluations (default 20)")
    parser.add_argument("--final", choices=["zero", "min"], default=None,
                        help="end the grid at sigma = 0 (default) or at the schedule's smallest training noise")
    parser.add_argument("--plan", default=None, metavar="FILE",
                        help="a tuned plan file (dpmsolve.tune, Plan.save) to sample with, instead of --solver, "
                             "--order, --grid, --steps and --final")
    parser.add_argument("--seed", type=int, default=0, help="seed of the start noise")
    parser.add_argument("--batch", type=int, default=4, help="number of images")
    parser.add_argument("--prompt", default=None, help="text prompt (text-to-image pipelines only)")
    parser.add_argument("--guidance", type=float, default=None,
                        help="classifier-free guidance scale (text-to-image pipelines: default 7.5; --model: 3)")
    parser.add_argument("--device", default=None, help="torch device, e.g. cpu, cuda, cuda:1 (default: cuda if "
                                                       "available, else cpu)")
    parser.add_argument("--out", default="dpmsolve-samples", help="folder for the PNGs")


def run_from_args(args: argparse.Namespace, parser: argparse.ArgumentParser | None = None) -> int:
    """Run ``dpmsolve sample`` for parsed ``args``; problems are raised as :class:`SampleError` (the command
    line reports them as one line). ``parser`` is unused (kept for callers that pass it)."""
    if args.pipeline_dir is None and args.model is None:
        print(NO_PIPELINE_MESSAGE, file=sys.stderr)
        return 2
    if args.plan is not None:
        given = [f"--{name}" for name in ("solver", "order", "grid", "steps", "final")
                 if getattr(args, name) is not None]
        if given:
            raise SampleError(f"--plan holds its own times and step settings: give no {' / '.join(given)} with it.")
    if args.model is not None and (args.pipeline_dir is not None or args.prompt is not None):
        raise SampleError("--model samples a shipped model: give no PIPELINE_DIR and no --prompt.")
    if args.guidance is not None and not math.isfinite(args.guidance):
        raise SampleError(f"--guidance must be a finite number, got {args.guidance}.")
    if args.model is None and args.upscale != 4:
        raise SampleError("--upscale applies to --model only (a pipeline's images are written as it makes them).")
    check_out_dir(args.out)
    require("PIL", "writing the PNG images")
    if args.model is None:
        require("diffusers", "sampling a diffusers pipeline")
    method = dict(solver=args.solver or "dpmsolver++", order=args.order, grid=args.grid,
                  steps=20 if args.steps is None else args.steps, final=args.final or "zero", plan=args.plan)
    if args.model is not None:
        paths = sample_zoo(args.model, **method, seed=args.seed, batch=args.batch, label=args.label,
                           guidance=args.guidance, out=args.out, device=args.device, upscale=args.upscale)
    else:
        paths = sample_pipeline(args.pipeline_dir, **method, seed=args.seed, batch=args.batch,
                                prompt=args.prompt, guidance=args.guidance, out=args.out, device=args.device)
    size = _image_size(paths[0]) if paths else None
    upscaled = (f" ({size[0] // args.upscale}x{size[1] // args.upscale} samples upscaled {args.upscale}x)"
                if size and args.model is not None and args.upscale != 1 else "")
    print(f"Wrote {len(paths)} image(s)" + (f" of {size[0]}x{size[1]} pixels" if size else "") + upscaled
          + f" to {Path(args.out)}/ ({paths[0].name if paths else ''}"
          + (f" ... {paths[-1].name}" if len(paths) > 1 else "") + ")")
    return 0


def resolve_device(device: str | None) -> str:
    """``device``, checked to be usable here (default: cuda if available, else cpu); a :class:`SampleError`
    saying why when it is not."""
    import torch

    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        torch.empty(0, device=torch.device(device))
    except (RuntimeError, AssertionError, ValueError) as exc:   # torch built without CUDA raises AssertionError
        reason = " ".join(str(exc).split()) or type(exc).__name__
        raise SampleError(f"--device {device} is not available here ({reason}).") from None
    return device


def _image_size(path: Path):
    from PIL import Image

    with Image.open(path) as im:
        return im.size


def _solver_options(solver: str, order: int | None) -> dict[str, Any]:
    from .solvers import get_solver

    if order is not None:
        options = {"order": int(order)}
        try:
            get_solver(solver, **options)
        except (ValueError, TypeError) as exc:
            raise SampleError(f"--solver {solver} --order {order}: {exc}") from None
        return options
    try:
        get_solver(solver, order=2)
        return {"order": 2}
    except (ValueError, TypeError):
        pass
    try:
        get_solver(solver)
    except (ValueError, TypeError) as exc:
        raise SampleError(f"--solver {solver}: {exc}") from None
    return {}  # a solver without an order option (ddim)


def sample_zoo(name: str, *, solver: str = "dpmsolver++", order: int | None = None, grid: str | None = None,
               steps: int = 20, final: str = "zero", seed: int = 0, batch: int = 4, label: int | None = None,
               guidance: float | None = None, out: str | Path = "dpmsolve-samples",
               plan: str | Path | None = None, device: str | None = None, upscale: int = 4) -> list[Path]:
    """Sample a shipped model natively with ``dp.sample`` (classifier-free guidance for class-conditional
    models) on ``device`` and write one PNG per image, upscaled ``upscale`` times with nearest neighbours.

    ``plan``: the path of a plan file, sampled with instead of ``solver`` / ``order`` / ``grid`` / ``steps`` /
    ``final`` (which are then ignored), after checking it against the model's schedule, sample shape and identity."""
    import torch

    from . import zoo
    from .sampling import sample

    if name not in zoo.MODELS:
        raise SampleError(f"--model {name}: unknown; shipped models: {', '.join(zoo.MODELS)}.")
    for option, value in (("--steps", steps), ("--batch", batch), ("--upscale", upscale)):
        at_least(option, value, 1)
    device = resolve_device(device)
    model = zoo.load(name)
    model.net.to(device)
    if model.num_classes == 0:   # unconditional (patches)
        if label is not None or guidance is not None:
            raise SampleError(f"--model {name} is unconditional: it takes no --label and no --guidance.")
        labels, denoiser = None, model.denoiser
    else:
        if label is not None and not 0 <= label < model.num_classes:
            raise SampleError(f"--label must be in [0, {model.num_classes - 1}] for {name}, got {label}.")
        labels = torch.full((batch,), label) if label is not None else torch.arange(batch) % model.num_classes
        denoiser = zoo.guided(model, labels.to(device), 3.0 if guidance is None else guidance)
    # drawn on the host: a seed gives the same noise on every device
    x = torch.randn((batch, *model.shape), generator=torch.Generator().manual_seed(seed)).to(device)
    if plan is not None:
        return _sample_zoo_plan(name, model, denoiser, x, labels, guidance, seed, plan, out, upscale, device)
    options = _solver_options(solver, order)
    if solver == "dpmsolver-v3":   # the statistics shipped for this model and guidance scale, recommended settings
        scale = None if model.num_classes == 0 else (3.0 if guidance is None else guidance)
        if order is None:
            from .solvers import DPMSolverV3

            options = DPMSolverV3.recommended(scale)
        options = {**options, "ems": zoo.statistics(name, scale)}
    try:
        result = sample(denoiser, x, solver, steps=steps, grid=grid or "logSNR", t_end=0.0 if final == "zero" else None,
                        seed=seed, **options)
    except ValueError as exc:
        raise SampleError(str(exc)) from None
    paths = _write_zoo_images(result.x, labels, out, upscale)
    shown = {k: v for k, v in options.items() if k != "ems"}
    print(f"{name}: {solver} {shown}, {steps} steps, {result.nfe} NFE, "
          + ("unconditional" if labels is None else f"guidance {3.0 if guidance is None else guidance}")
          + f", on {device}")
    return paths


def _load_plan(path, schedule, data_shape=None, model: str | None = None):
    """The plan file at ``path`` checked against the model it will run on; problems as a :class:`SampleError`."""
    from .tuning.plan import Plan, PlanError

    try:
        return Plan.load(path, schedule=schedule, data_shape=data_shape, model=model)
    except PlanError as exc:
        raise _plan_error(path, exc) from None


def _plan_error(path, exc: Exception) -> SampleError:
    """A plan problem reported by the scheduler (which names the file itself) as ``--plan FILE: ...``."""
    return SampleError(f"--plan {path}: {str(exc).removeprefix(f'The plan {path}: ')}")


def _model_identity(denoiser) -> str | None:
    """The identity ``dpmsolve.tune`` records for ``denoiser`` (None when it has no torch network to hash)."""
    from .tuning.search import model_identity

    return model_identity(denoiser) or None


def _sample_zoo_plan(name, model, denoiser, x, labels, guidance, seed, plan_path, out, upscale, device) -> list[Path]:
    from . import zoo
    from .sampling import sample

    plan = _load_plan(plan_path, model.schedule, model.shape, _model_identity(denoiser))
    if plan.uses_ems:      # its DPM-Solver-v3 steps run with the statistics shipped for this model and guidance
        plan = plan.with_ems(zoo.statistics(name, None if labels is None else (3.0 if guidance is None else guidance)))
    try:
        result = sample(denoiser, x, plan, seed=seed)
    except ValueError as exc:
        raise SampleError(str(exc)) from None
    paths = _write_zoo_images(result.x, labels, out, upscale)
    print(f"{name}: plan {plan_path} ({' '.join(s.short() for s in plan.steps)}), {plan.nfe} NFE "
          f"({result.nfe} used), "
          + ("unconditional" if labels is None else f"guidance {3.0 if guidance is None else guidance}")
          + f", on {device}")
    return paths


def _write_zoo_images(x, labels, out, upscale: int = 4) -> list[Path]:
    """One PNG per sample of ``x`` (in [-1, 1]), upscaled ``upscale`` times with nearest neighbours."""
    import numpy as np
    import torch
    from PIL import Image

    images = ((x.detach().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).numpy()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, img in enumerate(images):
        pixels = np.kron(img.reshape(img.shape[-2:]) if img.shape[0] == 1 else img.transpose(1, 2, 0),
                         np.ones((upscale, upscale) if img.shape[0] == 1 else (upscale, upscale, 1), dtype=np.uint8))
        path = out / (f"sample_{i:04d}.png" if labels is None else f"sample_{i:04d}_label{int(labels[i])}.png")
        Image.fromarray(pixels).save(path)
        paths.append(path)
    return paths


def _load_pipeline(pipeline_dir: str | Path):
    path = Path(pipeline_dir)
    if not path.exists():
        raise SampleError(f"PIPELINE_DIR {str(path)!r} does not exist; pass the folder of a diffusers pipeline "
                          "saved with save_pretrained.")
    if not path.is_dir():
        raise SampleError(f"PIPELINE_DIR {str(path)!r} is a file, not a folder; pass the folder of a diffusers "
                          "pipeline saved with save_pretrained.")
    if not (path / "model_index.json").is_file():
        raise SampleError(f"{str(path)!r} is not a diffusers pipeline: it has no model_index.json (a folder "
                          "written by DiffusionPipeline.save_pretrained has one).")
    from diffusers import DiffusionPipeline

    try:
        pipe = DiffusionPipeline.from_pretrained(str(path), local_files_only=True)
    except Exception as exc:  # noqa: BLE001 - any loading failure is the user's pipeline folder
        raise SampleError(f"could not load the diffusers pipeline in {str(path)!r}: {type(exc).__name__}: "
                          f"{exc}") from None
    scheduler = getattr(pipe, "scheduler", None)
    if scheduler is None or not hasattr(scheduler, "config"):
        raise SampleError(f"the pipeline in {str(path)!r} ({type(pipe).__name__}) has no scheduler to replace.")
    return pipe


@contextlib.contextmanager
def _float32_default():
    """diffusers pipelines assume torch's default dtype is float32 (as in a fresh process)."""
    import torch

    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def sample_pipeline(pipeline_dir: str | Path, *, solver: str = "dpmsolver++", order: int | None = None,
                    grid: str | None = None, steps: int = 20, final: str = "zero", seed: int = 0, batch: int = 4,
                    prompt: str | None = None, guidance: float | None = None, out: str | Path = "dpmsolve-samples",
                    device: str | None = None, plan: str | Path | None = None) -> list[Path]:
    """Load the pipeline in ``pipeline_dir``, sample ``batch`` images with a dpmsolve solver, write them as
    ``out/sample_0000.png``, ... and return their paths. Raises :class:`SampleError` for bad arguments or a
    folder that is not a loadable diffusers pipeline.

    ``plan``: the path of a plan file for the scheduler (its ``plan`` config field), used instead of ``solver`` /
    ``order`` / ``grid`` / ``steps`` / ``final`` (which are then ignored); checked against the pipeline's schedule
    and latent shape."""
    if batch < 1:
        raise SampleError(f"--batch must be >= 1, got {batch}.")
    device = resolve_device(device)
    if plan is None:
        if steps < 1:
            raise SampleError(f"--steps must be >= 1, got {steps}.")
        if final not in ("zero", "min"):
            raise SampleError(f"--final must be 'zero' or 'min', got {final!r}.")
        options = _solver_options(solver, order)
    else:
        plan = str(plan)
        _load_plan(plan, None)   # a missing or damaged file is reported before the pipeline loads
    import torch

    from .integrations.diffusers import DPMSolveScheduler
    from .tuning.plan import PlanError

    with _float32_default():
        pipe = _load_pipeline(pipeline_dir)
        params = inspect.signature(pipe.__call__).parameters
        kwargs: dict[str, Any] = {"num_inference_steps": int(steps), "output_type": "pil"}
        if "prompt" in params:
            if not prompt:
                raise SampleError(f"{type(pipe).__name__} is a text-to-image pipeline: pass --prompt TEXT.")
            kwargs["prompt"] = prompt
            if "num_images_per_prompt" in params:
                kwargs["num_images_per_prompt"] = int(batch)
            elif batch != 1:
                raise SampleError(f"{type(pipe).__name__} makes one image per prompt; use --batch 1.")
            if "guidance_scale" in params:
                kwargs["guidance_scale"] = 7.5 if guidance is None else float(guidance)
            elif guidance is not None:
                raise SampleError(f"{type(pipe).__name__} takes no guidance scale; drop --guidance.")
        elif "batch_size" in params:
            if prompt is not None:
                raise SampleError(f"{type(pipe).__name__} is an unconditional pipeline: it takes no --prompt.")
            if guidance is not None:
                raise SampleError(f"{type(pipe).__name__} is an unconditional pipeline: it takes no --guidance.")
            kwargs["batch_size"] = int(batch)
        else:
            raise SampleError(f"{type(pipe).__name__} is neither an unconditional pipeline (batch_size) nor a "
                              "text-to-image one (prompt); dpmsolve sample cannot drive it.")
        if "generator" not in params:
            raise SampleError(f"{type(pipe).__name__} takes no generator, so --seed could not be honoured.")

        if plan is None:
            overrides: dict[str, Any] = {"solver": solver, "solver_options": options, "final_sigma": final}
            if grid is not None:
                overrides["grid"] = grid
        else:
            overrides = {"plan": plan}
        try:
            scheduler = DPMSolveScheduler.from_config(pipe.scheduler.config, **overrides)
        except PlanError as exc:
            raise _plan_error(plan, exc) from None
        except (ValueError, TypeError) as exc:
            raise SampleError(f"could not build the dpmsolve scheduler: {exc}") from None
        if plan is not None:
            steps = scheduler.plan.nfe
            kwargs["num_inference_steps"] = steps
        try:
            scheduler.set_timesteps(int(steps))  # fail here, not inside the pipeline, on a bad grid
        except (ValueError, TypeError) as exc:
            raise SampleError(f"could not build the dpmsolve scheduler: {exc}") from None
        pipe.scheduler = scheduler
        pipe = pipe.to(device)
        if plan is None:
            method = (f"{solver} {options or ''} on the {scheduler._grid_kind} grid, {steps} steps to "
                      f"{'sigma = 0' if final == 'zero' else 't_min'}")
        else:
            method = f"plan {plan} ({' '.join(s.short() for s in scheduler.plan.steps)}), {steps} NFE"
        print(f"{type(pipe).__name__} from {pipeline_dir}: {method}, seed {seed}, on {device}")
        kwargs["generator"] = torch.Generator().manual_seed(int(seed))
        try:
            images = pipe(**kwargs).images
        except PlanError as exc:   # made for another latent shape
            raise _plan_error(plan, exc) from None

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, image in enumerate(images):
        path = out / f"sample_{i:04d}.png"
        image.save(path)
        paths.append(path)
    return paths


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m dpmsolve.sample_cli`` = ``dpmsolve sample``."""
    from .cli import main as cli_main

    return cli_main(["sample", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
