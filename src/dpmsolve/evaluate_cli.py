"""``dpmsolve evaluate DIR``: the shipped models' metrics over a folder of generated images, streamed.

Reads the PNGs (or ``.npz`` shards) that ``dpmsolve generate`` wrote, ``chunk`` images at a time, and computes
the metrics of :mod:`dpmsolve.zoo.metrics` without holding the images:

- ``digits`` / ``digits-flow``: **digits-FD** (the Frechet distance of the shipped classifier's features against
  the real training digits, from running sums of the features and their outer products, float64) and **class
  accuracy** (the classifier's label against the label the image was made for: from the manifest's class list, or
  the shards' ``labels``);
- ``patches``: the **patches distance** (multi-scale sliced Wasserstein). It needs the sorted projections of all
  images, so it keeps those: 3 x 256 numbers per image (the images themselves are 3072 numbers each).

The images are scored as written (8-bit, as FID scores PNGs); ``--upscale`` (default from the manifest) is undone
by taking every N-th pixel. The numbers equal ``zoo.metrics.digits_fd`` / ``class_accuracy`` /
``patches_distance`` on all images at once, to round-off.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

from .cli import UsageError, at_least, require

__all__ = ["EXAMPLES", "Evaluation", "add_arguments", "evaluate_folder", "iter_images", "run_from_args"]

EXAMPLES = """examples:
    dpmsolve evaluate DIR                  # the model named in DIR/manifest.json
    dpmsolve evaluate DIR --model digits   # a folder of 8x8 digit PNGs made elsewhere (no labels: FD only)"""

_DIGITS = ("digits", "digits-flow")


@dataclass
class Evaluation:
    """The metrics of one folder: ``values`` maps a metric name to its value."""

    folder: Path
    model: str
    images: int
    values: dict = field(default_factory=dict)
    notes: list = field(default_factory=list)

    def table(self) -> str:
        lines = [f"{self.folder}: {self.images} images scored as {self.model}", "", "| metric | value |",
                 "|---|---:|"]
        lines += [f"| {k} | {v:.4f} |" for k, v in self.values.items()]
        return "\n".join(lines + [""] * bool(self.notes) + [f"({n})" for n in self.notes])

    def to_dict(self) -> dict:
        return {"folder": str(self.folder), "model": self.model, "images": self.images, **self.values}


def iter_images(folder, chunk: int = 1000, classes: Sequence[int] | None = None
                ) -> Iterator[tuple["np.ndarray", "np.ndarray", "np.ndarray | None"]]:  # noqa: F821
    """``(seeds, images uint8 (N, H, W, C), labels or None)`` of the generate folder ``folder``, at most
    ``chunk`` images at a time: its ``.npz`` shards, else its ``SEED.png`` files in seed order. Labels come from
    the shards, or from ``classes`` (image ``s`` was made for ``classes[s % len(classes)]``)."""
    import numpy as np

    from .generate import _NPZ, _PNG, _png_name

    folder = Path(folder)
    shards = sorted(p for p in folder.iterdir() if _NPZ.match(p.name))
    if shards:
        for path in shards:
            with np.load(path) as shard:
                seeds, images = shard["seeds"], shard["images"]
                labels = shard["labels"] if "labels" in shard.files else None
            for i in range(0, len(seeds), chunk):
                yield seeds[i:i + chunk], images[i:i + chunk], None if labels is None else labels[i:i + chunk]
        return
    from PIL import Image

    seeds = sorted(int(m.group(1)) for p in folder.iterdir() if (m := _PNG.match(p.name))
                   and p.name == _png_name(int(m.group(1))))
    for i in range(0, len(seeds), chunk):
        part = seeds[i:i + chunk]
        images = []
        for s in part:
            with Image.open(folder / _png_name(s)) as im:
                a = np.asarray(im)
            images.append(a[..., None] if a.ndim == 2 else a)
        labels = None if classes is None else np.asarray([classes[s % len(classes)] for s in part])
        yield np.asarray(part), np.stack(images), labels


def evaluate_folder(folder, model: str | None = None, upscale: int | None = None, chunk: int = 1000) -> Evaluation:
    """The shipped metrics of the images in ``folder`` (see the module docstring); ``model`` and ``upscale``
    default to the folder's manifest."""
    import numpy as np
    import torch

    from . import zoo
    from .generate import read_manifest
    from .zoo import metrics

    folder = Path(folder)
    manifest = read_manifest(folder)
    settings = manifest["settings"] if manifest else {}
    name = model or settings.get("model")
    if name is None:
        raise ValueError(f"{folder} has no manifest.json saying which model made the images; pass --model digits, "
                         "digits-flow or patches.")
    if name not in zoo.MODELS:
        raise ValueError(f"there is no shipped metric for the model {name!r}; metrics exist for "
                         f"{', '.join(zoo.MODELS)} (pass --model to score the images as one of those).")
    upscale = int(upscale or settings.get("upscale") or 1)
    classes = settings.get("classes") if model in (None, settings.get("model")) else None
    digits = name in _DIGITS
    n, correct, labelled = 0, 0, 0
    sums = None
    projections: list[list[torch.Tensor]] = [[], [], []]
    for seeds, images, labels in iter_images(folder, chunk, classes):
        x = torch.from_numpy(np.ascontiguousarray(images[:, ::upscale, ::upscale])).permute(0, 3, 1, 2)
        x = x.double() / 127.5 - 1.0
        want = (1, 8, 8) if digits else (3, 32, 32)
        if tuple(x.shape[1:]) != want:
            raise ValueError(f"{folder}: the images are {tuple(images.shape[1:3])} pixels with {images.shape[3]} "
                             f"channel(s) (after --upscale {upscale}: {tuple(x.shape[1:])}), not the "
                             f"{want} samples of {name}; pass the right --upscale or --model.")
        n += len(x)
        if digits:
            f = metrics.features(x.float())
            part = (f.sum(0), f.T @ f)
            sums = part if sums is None else (sums[0] + part[0], sums[1] + part[1])
            if labels is not None:
                correct += round(metrics.class_accuracy(x.float(), torch.as_tensor(labels)) * len(x))
                labelled += len(x)
        else:
            for k, (proj, _) in enumerate(metrics._level_projections(metrics._patch_images(x))):
                projections[k].append(proj)
    if n == 0:
        raise ValueError(f"{folder} holds no images written by dpmsolve generate (SEED.png or shard-*.npz).")
    result = Evaluation(folder, name, n)
    if digits:
        if n < 2:
            raise ValueError("digits-FD needs at least 2 images.")
        mu = sums[0] / n
        cov = (sums[1] - n * np.outer(mu, mu)) / (n - 1)
        result.values["digits-FD"] = metrics.frechet_distance(mu, cov, *metrics.reference_stats())
        if labelled:
            result.values["class accuracy"] = correct / labelled
        else:
            result.notes.append("no labels known (no manifest with classes, no shards): class accuracy skipped")
    else:
        reference = metrics._reference_projections()
        levels = [torch.cat(p).sort(dim=0).values for p in projections]
        result.values["patches distance"] = float(np.mean([metrics._swd_sorted(a, b) / scale
                                                           for a, (b, scale) in zip(levels, reference)]))
    result.notes.append("compare numbers computed from equally many images: both metrics are biased upward for "
                        "small samples")
    return result


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``dpmsolve evaluate``."""
    parser.add_argument("folder", metavar="DIR", help="a folder written by dpmsolve generate")
    parser.add_argument("--model", default=None,
                        help="score as this shipped model's images: digits, digits-flow, patches (default: the "
                             "model in DIR/manifest.json)")
    parser.add_argument("--upscale", type=int, default=None, metavar="N",
                        help="the images are upscaled N times (default: from the manifest, else 1)")
    parser.add_argument("--chunk", type=int, default=1000, metavar="N", help="images read at a time")
    parser.add_argument("--json", default=None, metavar="FILE", help="also write the numbers as JSON")


def run_from_args(args: argparse.Namespace) -> int:
    """Run ``dpmsolve evaluate`` for parsed ``args``."""
    at_least("--chunk", args.chunk, 1)
    if args.upscale is not None:
        at_least("--upscale", args.upscale, 1)
    folder = Path(args.folder)
    if not folder.is_dir():
        raise UsageError(f"DIR {folder}: {'is a file, not a folder' if folder.exists() else 'does not exist'}.")
    if args.json is not None and Path(args.json).is_dir():
        raise UsageError(f"--json {args.json}: is a folder, not a file.")
    require("scipy", "dpmsolve evaluate (the Frechet distance)", 'pip install "dpmsolve[lab]"')
    require("PIL", "reading PNG images")
    try:
        report = evaluate_folder(folder, model=args.model, upscale=args.upscale, chunk=args.chunk)
    except (ValueError, TypeError) as exc:
        raise UsageError(str(exc)) from None
    print(report.table())
    if args.json is not None:
        Path(args.json).write_text(json.dumps(report.to_dict(), indent=1) + "\n")
        print(f"-> {args.json}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m dpmsolve.evaluate_cli DIR`` = ``dpmsolve evaluate DIR``."""
    from .cli import main as cli_main

    return cli_main(["evaluate", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
