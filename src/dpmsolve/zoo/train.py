"""Train the shipped zoo models on the CPU: ``python -m dpmsolve.zoo.train NAME [--steps N] [--minutes M] [--out PATH]``.

NAME is ``digits``, ``digits-flow``, ``digits-classifier`` or ``patches``; all use the same training loop
(``train_digits``), parametrised by a config dict whose ``family`` picks the loss (``_family``) and whose
``dataset`` picks the data (``_dataset``).

``digits``: a class-conditional :class:`~dpmsolve.zoo.nets.DigitsUNet` on scikit-learn's
bundled 8x8 digits (pixel values 0..16 scaled to ``[-1, 1]``), with

- the DDPM linear-beta schedule ``DiscreteVP.linear()`` (1000 train steps, betas 1e-4 .. 0.02);
- the standard noise-prediction loss: train index ``n ~ U{0..999}``, ``t = (n + 1) / 1000``,
  ``x_t = alpha_t x0 + sigma_t eps``, loss ``|eps_theta(x_t, n, y) - eps|^2``; the network's time input is the
  train index ``n`` (what ``wrap_model(time_input="discrete")`` passes at sampling time);
- label dropout: with probability 0.1 the label is replaced by the null class ``10`` (classifier-free guidance);
- AdamW (lr 2e-3, 200 warmup steps, cosine decay to 5% of the peak), batch 128, gradient clipping at 1.0, and an
  exponential moving average of the weights (decay 0.999) which is what gets saved;
- a fixed split: a seeded permutation holds out 10% of the 1797 digits (``digits_data("test")``) for evaluation.

Everything is seeded (``--seed``, default 0) and runs single-process on the CPU with 2 threads, so the same
command reproduces the shipped weights' quality (bit-exact reproduction also needs the same torch build).
The shipped ``weights/digits.safetensors`` came from ``python -m dpmsolve.zoo.train digits`` (defaults).
``--minutes`` caps the wall time (training stops early, and the metadata records the steps actually run).
``--threads`` sets the CPU threads (default 2; 1 is much faster on a machine busy with other work).

``digits-flow`` (``DIGITS_FLOW_CONFIG``): the same network, data, label dropout, optimizer, EMA and split, trained
as a rectified flow (``RectifiedFlow()``: ``x_t = (1 - t) x0 + t eps``, ``t ~ U(0, 1)``) with the velocity loss
``|v_theta(x_t, 1000 t, y) - (eps - x0)|^2`` (``flow_loss``), 3500 steps; loads as
``wrap_model(net, RectifiedFlow(), prediction="flow", time_input="1000t")``. The shipped weights came from
``python -m dpmsolve.zoo.train digits-flow --threads 1`` (the thread count does not change the random stream).

``digits-classifier`` (``DIGITS_CLASSIFIER_CONFIG``): the small CNN ``DigitsClassifier`` used by
:mod:`dpmsolve.zoo.metrics`, trained with cross-entropy on randomly +-1-pixel-shifted training digits (no label
dropout, EMA 0.99, 1200 steps); the metadata records its held-out accuracy.

``patches`` (``PATCHES_CONFIG``): an unconditional :class:`~dpmsolve.zoo.nets.PatchesUNet` (24-96 channels,
~1M parameters) on 32x32 RGB patches of scikit-learn's two bundled photos (``load_sample_images()``: china.jpg,
flower.jpg), each downsampled 2x (2x2 box average, 213x320) and scaled to ``[-1, 1]`` (``patch_images``).
The photos are cut into a 3 x 5 grid of 64x64 blocks and a seeded 4 blocks of each are held out
(``heldout_blocks``; ``patches_data("test")``: the 200 patches inside them at stride 8); training draws random
crops that overlap no held-out block (``train_positions``), with random horizontal flips. The
schedule is the continuous cosine ``CosineVP()`` (t in [1e-3, 0.9946]), the loss the v-prediction loss
``|v_theta(x_t, 1000 t) - (alpha_t eps - sigma_t x0)|^2`` with ``t ~ U(t_min, t_max)`` (``v_loss``); it loads as
``wrap_model(net, CosineVP(), prediction="v", time_input="1000t")``. Same optimizer and EMA as the digits
(lr 1.5e-3, batch 64, EMA 0.999), 2800 steps, 37 minutes with ``--threads 1`` here; the shipped weights came
from ``python -m dpmsolve.zoo.train patches --threads 1``.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from pathlib import Path

import numpy as np
import torch

from ..schedules import CosineVP, DiscreteVP

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"

DIGITS_CONFIG = {
    "name": "digits",
    "architecture": "DigitsUNet",
    "net_kwargs": {"num_classes": 10, "ch": 32, "emb_dim": 128, "in_channels": 1},
    "schedule": "DiscreteVP.linear(n=1000, beta_start=1e-4, beta_end=0.02)",
    "prediction": "eps",
    "time_input": "discrete",
    "num_classes": 10,
    "null_class": 10,
    "shape": [1, 8, 8],
    "data": "sklearn.datasets.load_digits, x / 8 - 1, 90/10 seeded split",
    "label_dropout": 0.1,
    "batch_size": 128,
    "lr": 2e-3,
    "warmup": 200,
    "ema_decay": 0.999,
    "steps": 9500,
    "family": "eps",
}

# The same network and recipe as a rectified-flow model: x_t = (1 - t) x0 + t eps with t ~ U(0, 1), the network
# predicts the velocity eps - x0 from (x_t, 1000 t, y).
DIGITS_FLOW_CONFIG = {
    **DIGITS_CONFIG,
    "name": "digits-flow",
    "schedule": "RectifiedFlow()",
    "prediction": "flow",
    "time_input": "1000t",
    "family": "flow",
    "time_sampling": "uniform",
    "steps": 3500,
}

# A small CNN classifier of the 8x8 digits (used by dpmsolve.zoo.metrics), trained with the same loop:
# cross-entropy on lightly augmented training digits (random +-1 pixel shifts), no label dropout.
DIGITS_CLASSIFIER_CONFIG = {
    "name": "digits-classifier",
    "family": "classifier",
    "architecture": "DigitsClassifier",
    "net_kwargs": {"num_classes": 10, "ch": 32, "feat_dim": 64},
    "num_classes": 10,
    "shape": [1, 8, 8],
    "data": DIGITS_CONFIG["data"],
    "augment": "random shift by -1..1 pixels (zero = -1 padding)",
    "label_dropout": 0.0,
    "null_class": 10,
    "batch_size": 128,
    "lr": 2e-3,
    "warmup": 50,
    "ema_decay": 0.99,
    "steps": 1200,
}


# Unconditional 32x32 RGB patches of scikit-learn's two sample photos, cosine schedule, v-prediction.
PATCHES_CONFIG = {
    "name": "patches",
    "family": "v",
    "dataset": "patches",
    "architecture": "PatchesUNet",
    "net_kwargs": {"ch": 24, "mults": [1, 2, 3, 4], "emb_dim": 128, "in_channels": 3},
    "schedule": "CosineVP()",
    "prediction": "v",
    "time_input": "1000t",
    "num_classes": 0,
    "null_class": -1,
    "shape": [3, 32, 32],
    "data": "sklearn.datasets.load_sample_images (china, flower), 2x box-downsampled, x / 127.5 - 1; "
            "random 32x32 crops (+ flips) avoiding 4 seeded held-out 64x64 blocks per photo",
    "label_dropout": 0.0,
    "batch_size": 64,
    "lr": 1.5e-3,
    "warmup": 100,
    "ema_decay": 0.999,
    "steps": 2800,
}

PATCH = 32
PATCH_BLOCK = 64        # held-out blocks: the downsampled photos are cut into a 3 x 5 grid of 64 x 64 blocks
PATCH_HOLDOUT_BLOCKS = 4  # per photo, chosen by a seeded permutation (27% of the gridded area)


def patch_images() -> torch.Tensor:
    """scikit-learn's two sample photos, 2x box-downsampled to ``(2, 3, 213, 320)`` float32 in ``[-1, 1]``."""
    from sklearn.datasets import load_sample_images

    out = []
    for im in load_sample_images().images:  # (427, 640, 3) uint8
        h, w = im.shape[0] // 2, im.shape[1] // 2
        x = im[: 2 * h, : 2 * w].astype(np.float64).reshape(h, 2, w, 2, 3).mean(axis=(1, 3))
        out.append(torch.from_numpy((x / 127.5 - 1.0).astype(np.float32)).permute(2, 0, 1))
    return torch.stack(out)


def heldout_blocks(seed: int = 0) -> list[tuple[int, int, int]]:
    """The held-out ``(photo, top, left)`` 64x64 blocks: a seeded choice of 4 of the 15 grid blocks per photo."""
    rs = np.random.RandomState(seed)
    blocks = []
    for k in range(2):
        for b in sorted(rs.permutation(15)[:PATCH_HOLDOUT_BLOCKS].tolist()):
            blocks.append((k, PATCH_BLOCK * (b // 5), PATCH_BLOCK * (b % 5)))
    return blocks


def train_positions(images: torch.Tensor | None = None) -> torch.Tensor:
    """Every ``(photo, top, left)`` of a 32x32 crop that does not overlap a held-out block, ``(N, 3)`` int64."""
    shape = (2, 213, 320) if images is None else (images.shape[0], images.shape[2], images.shape[3])
    ok = torch.ones(shape[0], shape[1] - PATCH + 1, shape[2] - PATCH + 1, dtype=torch.bool)
    for k, top, left in heldout_blocks():
        ok[k, max(0, top - PATCH + 1): top + PATCH_BLOCK, max(0, left - PATCH + 1): left + PATCH_BLOCK] = False
    return ok.nonzero()


def patches_data(split: str = "test", stride: int = 8) -> torch.Tensor:
    """Real 32x32 patches, ``(N, 3, 32, 32)`` in ``[-1, 1]``: ``split`` ``"test"`` gives every patch at ``stride``
    inside the held-out blocks (8 blocks x 25 = 200 at stride 8), ``"train"`` every training crop position at
    ``stride`` (positions on the stride grid that overlap no held-out block)."""
    images = patch_images()
    if split == "test":
        out = []
        for k, top, left in heldout_blocks():
            block = images[k, :, top:top + PATCH_BLOCK, left:left + PATCH_BLOCK]
            p = block.unfold(1, PATCH, stride).unfold(2, PATCH, stride)      # (3, nh, nw, 32, 32)
            out.append(p.permute(1, 2, 0, 3, 4).reshape(-1, 3, PATCH, PATCH))
        return torch.cat(out).contiguous()
    if split != "train":
        raise ValueError(f"split must be 'train' or 'test', got {split!r}.")
    pos = train_positions(images)
    pos = pos[(pos[:, 1] % stride == 0) & (pos[:, 2] % stride == 0)]
    return _crops(images, pos)


def _crops(images: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    return torch.stack([images[k, :, i:i + PATCH, j:j + PATCH] for k, i, j in pos.tolist()])


def random_patches(n: int, generator=None, flip: bool = True, images: torch.Tensor | None = None,
                   positions: torch.Tensor | None = None) -> torch.Tensor:
    """``n`` random 32x32 training crops (uniform over :func:`train_positions`; with ``flip``, random horizontal
    flips), ``(n, 3, 32, 32)`` in ``[-1, 1]``."""
    images = patch_images() if images is None else images
    positions = train_positions(images) if positions is None else positions
    idx = torch.randint(0, len(positions), (n,), generator=generator)
    f = torch.rand((n,), generator=generator) < 0.5 if flip else torch.zeros(n, dtype=torch.bool)
    out = _crops(images, positions[idx])
    out[f] = out[f].flip(-1)
    return out


def digits_data(split: str = "train", seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's 8x8 digits as ``(x, y)``: x float32 ``(N, 1, 8, 8)`` in ``[-1, 1]``, y int64 labels.

    ``split`` is ``"train"`` (90%), ``"test"`` (the held-out 10%) or ``"all"``; the split is a fixed seeded
    permutation, so tests can evaluate on digits the shipped model never saw.
    """
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.from_numpy(d.images.astype(np.float32) / 8.0 - 1.0).unsqueeze(1)
    y = torch.from_numpy(d.target.astype(np.int64))
    perm = np.random.RandomState(seed).permutation(len(y))
    n_test = len(y) // 10
    if split == "all":
        return x, y
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train', 'test' or 'all', got {split!r}.")
    idx = torch.from_numpy(perm[:n_test] if split == "test" else perm[n_test:])
    return x[idx], y[idx]


def schedule_tables(schedule: DiscreteVP) -> tuple[torch.Tensor, torch.Tensor]:
    """``(alpha_n, sigma_n)`` at the train steps ``t = (n + 1) / N`` as float32 tensors."""
    t = (np.arange(schedule.num_train_steps) + 1.0) / schedule.num_train_steps
    return (torch.tensor(schedule.alpha(t), dtype=torch.float32),
            torch.tensor(schedule.sigma(t), dtype=torch.float32))


def eps_loss(net, x0, y, alphas, sigmas, generator=None, n=None):
    """The noise-prediction loss ``mean |net(alpha x0 + sigma eps, n, y) - eps|^2`` (random n unless given)."""
    if n is None:
        n = torch.randint(0, alphas.numel(), (x0.shape[0],), generator=generator)
    eps = torch.randn(x0.shape, generator=generator, dtype=x0.dtype)
    a, s = alphas[n].view(-1, 1, 1, 1), sigmas[n].view(-1, 1, 1, 1)
    return (net(a * x0 + s * eps, n.float(), y) - eps).pow(2).mean()


def flow_loss(net, x0, y, generator=None, t=None):
    """The rectified-flow loss ``mean |net((1 - t) x0 + t eps, 1000 t, y) - (eps - x0)|^2`` (t ~ U(0, 1) unless given)."""
    if t is None:
        t = torch.rand((x0.shape[0],), generator=generator, dtype=x0.dtype)
    t = torch.as_tensor(t, dtype=x0.dtype).expand(x0.shape[0])
    eps = torch.randn(x0.shape, generator=generator, dtype=x0.dtype)
    tt = t.view(-1, 1, 1, 1)
    return (net((1 - tt) * x0 + tt * eps, 1000.0 * t, y) - (eps - x0)).pow(2).mean()


def v_loss(net, x0, y=None, schedule=None, generator=None, t=None):
    """The v-prediction loss ``mean |net(alpha x0 + sigma eps, 1000 t) - (alpha eps - sigma x0)|^2`` under a
    continuous schedule (default ``CosineVP()``), ``t ~ U(t_min, t_max)`` unless given; ``y`` is ignored."""
    schedule = schedule or CosineVP()
    if t is None:
        t = schedule.t_min + (schedule.t_max - schedule.t_min) * torch.rand((x0.shape[0],), generator=generator,
                                                                            dtype=torch.float64)
    t = torch.as_tensor(t, dtype=torch.float64).expand(x0.shape[0])
    a = torch.as_tensor(schedule.alpha(t.numpy()), dtype=x0.dtype).view(-1, 1, 1, 1)
    s = torch.as_tensor(schedule.sigma(t.numpy()), dtype=x0.dtype).view(-1, 1, 1, 1)
    eps = torch.randn(x0.shape, generator=generator, dtype=x0.dtype)
    return (net(a * x0 + s * eps, (1000.0 * t).to(x0.dtype)) - (a * eps - s * x0)).pow(2).mean()


def random_shift(x, generator=None, max_shift: int = 1):
    """Shift each image by a random integer offset in ``[-max_shift, max_shift]`` per axis, padding with -1."""
    b, _, h, w = x.shape
    pad = torch.nn.functional.pad(x, (max_shift,) * 4, value=-1.0)
    off = torch.randint(0, 2 * max_shift + 1, (b, 2), generator=generator)
    return torch.stack([pad[i, :, off[i, 0]:off[i, 0] + h, off[i, 1]:off[i, 1] + w] for i in range(b)])


def classifier_loss(net, x0, y, generator=None):
    """Cross-entropy of the classifier on randomly shifted images."""
    return torch.nn.functional.cross_entropy(net(random_shift(x0, generator)), y)


def _family(cfg):
    """``(train_loss(net, x0, y, generator), heldout_metric(net, x, y) -> (name, value))`` of a model family."""
    family = cfg.get("family", "eps")
    if family == "eps":
        alphas, sigmas = schedule_tables(DiscreteVP.linear())

        def heldout(net, x, y):
            g = torch.Generator().manual_seed(1234)
            return "heldout_loss", float(np.mean([eps_loss(net, x, y, alphas, sigmas, generator=g).item()
                                                  for _ in range(20)]))

        return (lambda net, x0, y, generator: eps_loss(net, x0, y, alphas, sigmas, generator=generator)), heldout
    if family == "flow":
        def heldout(net, x, y):
            g = torch.Generator().manual_seed(1234)
            return "heldout_loss", float(np.mean([flow_loss(net, x, y, generator=g).item() for _ in range(20)]))

        return flow_loss, heldout
    if family == "v":
        def heldout(net, x, y):
            g = torch.Generator().manual_seed(1234)
            return "heldout_loss", float(np.mean([v_loss(net, x, generator=g).item() for _ in range(10)]))

        return (lambda net, x0, y, generator: v_loss(net, x0, generator=generator)), heldout
    if family == "classifier":
        def heldout(net, x, y):
            return "heldout_accuracy", float((net(x).argmax(1) == y).float().mean())

        return classifier_loss, heldout
    raise ValueError(f"Unknown model family {family!r}.")


def _dataset(cfg):
    """``(n_train, batch(generator) -> (x0, y), heldout () -> (x, y))`` of a config's data set."""
    if cfg.get("dataset", "digits") == "patches":
        images = patch_images()
        positions = train_positions(images)

        def batch(gen):
            return random_patches(cfg["batch_size"], generator=gen, images=images, positions=positions), None

        return f"{len(positions)} training crop positions", batch, lambda: (patches_data("test"), None)

    x_train, y_train = digits_data("train")

    def batch(gen):
        idx = torch.randint(0, len(y_train), (cfg["batch_size"],), generator=gen)
        x0, y = x_train[idx], y_train[idx].clone()
        drop = torch.rand(y.shape, generator=gen) < cfg["label_dropout"]
        y[drop] = cfg["null_class"]
        return x0, y

    return f"{len(y_train)} training images", batch, lambda: digits_data("test")


def train_digits(steps: int | None = None, minutes: float | None = None, out: Path | None = None, seed: int = 0,
                 log_every: int = 250, config: dict | None = None, threads: int = 2) -> Path:
    """Train the digits model (recipe in the module docstring) and save the EMA weights; returns the path.

    ``config`` picks the model (default ``DIGITS_CONFIG``; ``DIGITS_FLOW_CONFIG``, ``DIGITS_CLASSIFIER_CONFIG``).
    """
    cfg = dict(config or DIGITS_CONFIG)
    steps = int(steps or cfg["steps"])
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return _train_digits(cfg, steps, minutes, out, seed, log_every)
    finally:
        torch.set_num_threads(previous)


def _train_digits(cfg, steps, minutes, out, seed, log_every):
    from safetensors.torch import save_file

    from .nets import ARCHITECTURES

    torch.manual_seed(seed)
    np.random.seed(seed)
    gen = torch.Generator().manual_seed(seed)

    data_desc, next_batch, heldout_data = _dataset(cfg)
    train_loss, heldout_metric = _family(cfg)
    net = ARCHITECTURES[cfg["architecture"]](**cfg["net_kwargs"]).float()
    ema = copy.deepcopy(net).requires_grad_(False)
    opt = torch.optim.AdamW(net.parameters(), lr=cfg["lr"], weight_decay=0.0)

    def lr_at(i):
        if i < cfg["warmup"]:
            return (i + 1) / cfg["warmup"]
        p = (i - cfg["warmup"]) / max(1, steps - cfg["warmup"])
        return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * p))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    n_params = sum(p.numel() for p in net.parameters())
    print(f"{cfg['name']}: {n_params} parameters, {data_desc}, {steps} steps", flush=True)
    start, running, done = time.time(), None, 0
    for i in range(steps):
        x0, y = next_batch(gen)
        loss = train_loss(net, x0, y, generator=gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        sched.step()
        with torch.no_grad():
            d = min(cfg["ema_decay"], (1 + i) / (10 + i))
            for pe, p in zip(ema.parameters(), net.parameters()):
                pe.lerp_(p, 1 - d)
        running = loss.item() if running is None else 0.99 * running + 0.01 * loss.item()
        done = i + 1
        elapsed = time.time() - start
        if done % log_every == 0 or done == steps:
            print(f"step {done:6d}  loss {running:.4f}  lr {sched.get_last_lr()[0]:.2e}  {elapsed:6.0f}s", flush=True)
        if minutes is not None and elapsed > 60 * minutes:
            print(f"stopping at step {done}: --minutes {minutes} reached", flush=True)
            break
    train_seconds = time.time() - start

    # Held-out loss (fixed noise) or accuracy of the EMA net, recorded in the metadata.
    x_test, y_test = heldout_data()
    ema.eval()
    with torch.no_grad():
        metric, value = heldout_metric(ema, x_test, y_test)
    print(f"{metric} (EMA net): {value:.4f}", flush=True)

    out = Path(out) if out else WEIGHTS_DIR / f"{cfg['name']}.safetensors"
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {k: json.dumps(v) if not isinstance(v, str) else v for k, v in cfg.items()}
    meta.update({
        "steps": str(done),
        "train_seconds": f"{train_seconds:.0f}",
        "final_loss": f"{running:.5f}",
        metric: f"{value:.5f}",
        "seed": str(seed),
        "num_params": str(n_params),
        "torch_version": torch.__version__,
        "format": "dpmsolve.zoo/1",
    })
    state = {k: v.detach().float().contiguous() for k, v in ema.state_dict().items()}
    save_file(state, str(out), metadata=meta)
    print(f"saved {out} ({out.stat().st_size} bytes)", flush=True)
    return out


def train_digits_flow(**kwargs) -> Path:
    """Train the rectified-flow digits model (``DIGITS_FLOW_CONFIG``) with the same loop."""
    return train_digits(config=DIGITS_FLOW_CONFIG, **kwargs)


def train_classifier(**kwargs) -> Path:
    """Train the digits classifier (``DIGITS_CLASSIFIER_CONFIG``) with the same loop."""
    kwargs.setdefault("log_every", 100)
    return train_digits(config=DIGITS_CLASSIFIER_CONFIG, **kwargs)


def train_patches(**kwargs) -> Path:
    """Train the unconditional patches model (``PATCHES_CONFIG``) with the same loop."""
    kwargs.setdefault("log_every", 100)
    return train_digits(config=PATCHES_CONFIG, **kwargs)


TRAINERS = {"digits": train_digits, "digits-flow": train_digits_flow, "digits-classifier": train_classifier,
            "patches": train_patches}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m dpmsolve.zoo.train", description=__doc__.split("\n")[0])
    parser.add_argument("name", choices=sorted(TRAINERS))
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps (default: the shipped recipe's)")
    parser.add_argument("--minutes", type=float, default=None, help="stop after this much wall time")
    parser.add_argument("--out", type=Path, default=None, help="output .safetensors (default: the package's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2, help="CPU threads (1 is faster on a busy machine)")
    args = parser.parse_args(argv)
    TRAINERS[args.name](steps=args.steps, minutes=args.minutes, out=args.out, seed=args.seed, threads=args.threads)


if __name__ == "__main__":
    main()
