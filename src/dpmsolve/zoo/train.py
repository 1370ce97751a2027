"""Train the shipped zoo models on the CPU: ``python -m dpmsolve.zoo.train digits [--steps N] [--minutes M] [--out PATH]``.

``digits`` (the only model so far): a class-conditional :class:`~dpmsolve.zoo.nets.DigitsUNet` on scikit-learn's
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

from ..schedules import DiscreteVP

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
}


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


def train_digits(steps: int | None = None, minutes: float | None = None, out: Path | None = None, seed: int = 0,
                 log_every: int = 250) -> Path:
    """Train the digits model (recipe in the module docstring) and save the EMA weights; returns the path."""
    cfg = dict(DIGITS_CONFIG)
    steps = int(steps or cfg["steps"])
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        return _train_digits(cfg, steps, minutes, out, seed, log_every)
    finally:
        torch.set_num_threads(threads)


def _train_digits(cfg, steps, minutes, out, seed, log_every):
    from safetensors.torch import save_file

    from .nets import ARCHITECTURES

    torch.manual_seed(seed)
    np.random.seed(seed)
    gen = torch.Generator().manual_seed(seed)

    x_train, y_train = digits_data("train")
    schedule = DiscreteVP.linear()
    alphas, sigmas = schedule_tables(schedule)
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
    print(f"digits: {n_params} parameters, {len(y_train)} training images, {steps} steps", flush=True)
    start, running, done = time.time(), None, 0
    for i in range(steps):
        idx = torch.randint(0, len(y_train), (cfg["batch_size"],), generator=gen)
        x0, y = x_train[idx], y_train[idx].clone()
        drop = torch.rand(y.shape, generator=gen) < cfg["label_dropout"]
        y[drop] = cfg["null_class"]
        loss = eps_loss(net, x0, y, alphas, sigmas, generator=gen)
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

    # Held-out loss of the EMA net (fixed noise), recorded in the metadata.
    x_test, y_test = digits_data("test")
    g = torch.Generator().manual_seed(1234)
    ema.eval()
    with torch.no_grad():
        test_loss = float(np.mean([eps_loss(ema, x_test, y_test, alphas, sigmas, generator=g).item()
                                   for _ in range(20)]))
    print(f"held-out eps loss (EMA net): {test_loss:.4f}", flush=True)

    out = Path(out) if out else WEIGHTS_DIR / "digits.safetensors"
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {k: json.dumps(v) if not isinstance(v, str) else v for k, v in cfg.items()}
    meta.update({
        "steps": str(done),
        "train_seconds": f"{train_seconds:.0f}",
        "final_loss": f"{running:.5f}",
        "heldout_loss": f"{test_loss:.5f}",
        "seed": str(seed),
        "num_params": str(n_params),
        "torch_version": torch.__version__,
        "format": "dpmsolve.zoo/1",
    })
    state = {k: v.detach().float().contiguous() for k, v in ema.state_dict().items()}
    save_file(state, str(out), metadata=meta)
    print(f"saved {out} ({out.stat().st_size} bytes)", flush=True)
    return out


TRAINERS = {"digits": train_digits}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m dpmsolve.zoo.train", description=__doc__.split("\n")[0])
    parser.add_argument("name", choices=sorted(TRAINERS))
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps (default: the shipped recipe's)")
    parser.add_argument("--minutes", type=float, default=None, help="stop after this much wall time")
    parser.add_argument("--out", type=Path, default=None, help="output .safetensors (default: the package's)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    TRAINERS[args.name](steps=args.steps, minutes=args.minutes, out=args.out, seed=args.seed)


if __name__ == "__main__":
    main()
