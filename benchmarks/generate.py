"""Throughput of bulk generation: images per second of ``dpmsolve generate`` on 1 and 2 processes.

Runs the command line as a user would, each configuration in a fresh folder:

* 1 process, 1 thread: ``OMP_NUM_THREADS=1 python -m dpmsolve generate ...``
* 2 processes, 1 thread each: ``OMP_NUM_THREADS=1 torchrun --nproc_per_node 2 -m dpmsolve generate ...`` (gloo on
  CPU)

(One process with 2 threads is left out: on this shared 2-core machine, with other jobs running, OpenMP threads
that wait for each other made it 10x slower than one thread, a measure of the machine's load, not of dpmsolve.
For small models on CPUs, processes scale better than threads.)

for the ``digits`` model (classifier-free guidance 3, 8 steps to sigma = 0, batch 64, network slices of 32) with
DPM-Solver++ 2M and with SDE-DPM-Solver++ 2M, whose per-sample noise runs one solver state per sample (the
``sde / ode`` column is that cost). One more row runs DPM-Solver++ with ``--eval-batch 64`` (one network call per
batch instead of two slices of 32) to show what the fixed slices cost.

``images/s`` is the sampling loop's rate as ``generate`` measures it (written images over the loop's wall time,
all processes together; in the manifest); ``wall s`` is the whole command, start-up (imports, loading, process
group) included. The machine is shared: numbers from one run are noisy to some 20 %.

    python benchmarks/generate.py            # 512 seeds per configuration, about 1.5 minutes on 2 CPU cores
    python benchmarks/generate.py --quick    # 128 seeds

Results: a markdown table on stdout, ``generate.md``, ``generate.json`` and ``generate.png`` in ``--out``
(default ``benchmarks/results``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CONFIGS = [  # (label, processes, threads, solver, eval batch)
    ("1 process x 1 thread", 1, 1, "dpmsolver++", 32),
    ("2 processes x 1 thread", 2, 1, "dpmsolver++", 32),
    ("1 process x 1 thread", 1, 1, "sde-dpmsolver++", 32),
    ("2 processes x 1 thread", 2, 1, "sde-dpmsolver++", 32),
    ("1 process x 1 thread, --eval-batch 64", 1, 1, "dpmsolver++", 64),
]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(label, processes, threads, solver, eval_batch, seeds, folder: Path) -> dict:
    args = ["-m", "dpmsolve", "generate", "--model", "digits", "--guidance", "3", "--solver", solver, "--steps", "8",
            "--seeds", f"0-{seeds - 1}", "--batch", "64", "--eval-batch", str(eval_batch), "--out", str(folder),
            "--no-progress"]
    if processes > 1:
        args = ["-m", "torch.distributed.run", "--nproc_per_node", str(processes), "--master_port", str(_port()),
                *args]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONWARNINGS": "ignore"}
    start = time.perf_counter()
    done = subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True, timeout=600)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"{label} {solver} failed:\n{done.stderr[-3000:]}")
    last = json.loads((folder / "manifest.json").read_text())["runs"][-1]
    return {"config": label, "processes": processes, "threads": threads, "solver": solver,
            "eval_batch": eval_batch, "images": last["written"], "images_per_second": last["images_per_second"],
            "loop_seconds": last["seconds"], "wall_seconds": round(wall, 2)}


def table(rows: list[dict]) -> str:
    ode = {r["config"]: r["images_per_second"] for r in rows if r["solver"] == "dpmsolver++"}
    lines = ["| configuration | solver | images | images/s | sde / ode | loop s | wall s |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        ratio = (f"{r['images_per_second'] / ode[r['config']]:.2f}"
                 if r["solver"] != "dpmsolver++" and r["config"] in ode else "")
        lines.append(f"| {r['config']} | {r['solver']} | {r['images']} | {r['images_per_second']:.1f} | {ratio} | "
                     f"{r['loop_seconds']:.1f} | {r['wall_seconds']:.1f} |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    labels = [f"{r['config']}\n{r['solver']}" for r in rows]
    fig, ax = plt.subplots(figsize=(8, 0.55 * len(rows) + 1.2))
    colours = ["tab:blue" if r["solver"] == "dpmsolver++" else "tab:orange" for r in rows]
    ax.barh(range(len(rows)), [r["images_per_second"] for r in rows], color=colours)
    ax.set_yticks(range(len(rows)), labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("images / s (sampling loop, all processes)")
    ax.set_title("dpmsolve generate: digits, CFG 3, 8 steps, batch 64 (CPU)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=512, help="images per configuration")
    parser.add_argument("--quick", action="store_true", help="128 images per configuration")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = parser.parse_args(argv)
    seeds = 128 if args.quick else args.seeds
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    scratch = Path(tempfile.mkdtemp(prefix="dpmsolve-bench-generate-"))
    try:
        for i, config in enumerate(CONFIGS):
            rows.append(run(*config, seeds, scratch / f"run{i}"))
            print(f"{rows[-1]['config']:40s} {rows[-1]['solver']:16s} {rows[-1]['images_per_second']:7.1f} images/s",
                  flush=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    import torch

    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}"
    text = ("# Bulk generation throughput (`dpmsolve generate`)\n\n"
            f"`python benchmarks/generate.py{' --quick' if args.quick else ''}` on {machine} (a shared machine: "
            "expect some 20 % noise). Model `digits` (8x8, classifier-free guidance 3: every network call "
            "evaluates the conditional and unconditional halves), 8 steps to sigma = 0, `--batch 64 --eval-batch "
            f"32`, {seeds} images per row, PNG output. `images/s` is the sampling loop's rate (all processes); "
            "`wall s` includes start-up (imports, model loading, the process group). `sde / ode`: the cost of "
            "per-sample solver noise (one solver state per sample) against DPM-Solver++ in the same "
            "configuration.\n\n" + table(rows) + "\n")
    (out / "generate.md").write_text(text)
    (out / "generate.json").write_text(json.dumps({"seeds": seeds, "machine": machine, "rows": rows}, indent=1) + "\n")
    print("\n" + table(rows))
    written = [out / "generate.md", out / "generate.json"]
    if plot(rows, out / "generate.png"):
        written.append(out / "generate.png")
        (out / "generate.md").write_text(text + "\n![images per second](generate.png)\n")
    print("\nWrote " + ", ".join(str(p) for p in written))
    return 0


if __name__ == "__main__":
    sys.exit(main())
