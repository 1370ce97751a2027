"""Bulk generation (dpmsolve.generate, ``dpmsolve generate`` / ``evaluate``) and ems.compute across ranks.

Determinism: the same bytes for any batch size (in process) and for 1 vs 2 processes (``torchrun`` on CPU, gloo),
deterministic and stochastic solvers (Gaussian and Brownian noise). Resume: a run killed midway (SIGKILL) and
restarted makes only the missing seeds, and the result equals an uninterrupted run. A rank that fails or dies
stops the others with an error naming it. The whole file runs in about a minute on two CPU cores (four
multi-process launches).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import dpmsolve as dp
from dpmsolve import zoo
from dpmsolve.cli import main
from dpmsolve.generate import done_seeds, format_seeds, noise, parse_seeds, read_manifest, solver_seed

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(steps=4, eval_batch=4, progress=False)

# A network of one's own for the CLI (--network FILE.py:make). GEN_TEST_DIE="rank:calls:kill|raise" makes the
# process of that rank kill itself (SIGKILL) or raise after that many network calls.
NET = '''
import os, signal, torch, dpmsolve as dp

class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.w = torch.nn.Parameter(0.2 * torch.randn(48, 48, generator=g, dtype=torch.float32))
        self.calls = 0
        self.die = os.environ.get("GEN_TEST_DIE")

    def forward(self, x, t):
        self.calls += 1
        if self.die:
            rank, calls, mode = self.die.split(":")
            if int(os.environ.get("RANK", "0")) == int(rank) and self.calls > int(calls):
                if mode == "kill":
                    os.kill(os.getpid(), signal.SIGKILL)
                raise ValueError("the test network failed on purpose")
        h = x.reshape(len(x), -1).float()
        t = torch.as_tensor(t, dtype=torch.float32).reshape(-1, 1)
        return torch.tanh(h @ self.w + t / 1000.0).reshape(x.shape).to(x.dtype)

def make():
    return dp.wrap_model(Net(), dp.CosineVP(), prediction="eps", time_input="continuous")
'''


@pytest.fixture
def net_file(tmp_path) -> str:
    path = tmp_path / "gen_net.py"
    path.write_text(NET)
    return f"{path}:make"


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "GEN_TEST_DIE")}
    return {**env, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", **extra}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def _one_thread():
    """This process with one intra-op thread, as each torchrun worker here (OMP_NUM_THREADS=1): a CPU matmul's
    reduction order, and so its last bits, depends on the number of threads."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _torchrun(args, tmp_path, timeout=180, **env):
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
               str(_free_port()), *args]
    return subprocess.run(command, cwd=tmp_path, env=_env(**env), capture_output=True, text=True, timeout=timeout)


def _pngs(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.png"))}


def _samples(folder: Path) -> dict[int, np.ndarray]:
    out = {}
    for path in folder.glob("shard-*.npz"):
        with np.load(path) as shard:
            out.update({int(s): x for s, x in zip(shard["seeds"], shard["samples"])})
    return out


# --------------------------------------------------------------------------------------------- in process

def test_seeds_are_parsed_and_checked():
    assert parse_seeds("0-3,7,10-11") == [0, 1, 2, 3, 7, 10, 11]
    assert parse_seeds(5) == [5] and parse_seeds([3, 1]) == [3, 1]
    assert format_seeds(parse_seeds("0-3,7,10-11")) == "0-3,7,10-11"
    for bad, message in (("3-1", "empty"), ("a-b", "not a seed"), ("1,1", "given twice"), ("", "not a seed"),
                         ([], "empty"), (f"0-{2**32}", r"below 2\*\*32")):
        with pytest.raises(ValueError, match=message):
            parse_seeds(bad)
    assert solver_seed(0) != solver_seed(1) and 0 <= solver_seed(7) < 2**32


@pytest.mark.parametrize("solver", ["dpmsolver++", "sde-dpmsolver++", "dpmpp-2m-sde"])
def test_same_samples_for_any_batch_size(solver, tmp_path):
    """The float samples (npz) are identical for batches of 8, 3 and 1 (and the PNG bytes for 8 and 3)."""
    runs = {}
    for batch in (8, 3, 1):
        out = tmp_path / f"b{batch}"
        dp.generate("digits", "0-7", out, solver=solver, batch=batch, fmt="npz", **TINY)
        runs[batch] = _samples(out)
        assert sorted(runs[batch]) == list(range(8))
    for batch in (3, 1):
        assert all(np.array_equal(runs[8][s], runs[batch][s]) for s in range(8)), f"batch {batch} differs"
    if solver == "sde-dpmsolver++":
        png = {b: tmp_path / f"p{b}" for b in (8, 3)}
        for batch, out in png.items():
            dp.generate("digits", "0-7", out, solver=solver, batch=batch, **TINY)
        assert _pngs(png[8]) == _pngs(png[3]) and len(_pngs(png[3])) == 8


def test_an_image_is_what_dp_sample_gives_for_its_seed(tmp_path):
    """Image s = dp.sample(noise(s), solver, seed=solver_seed(s)) alone (stochastic: per-sample generators)."""
    dp.generate("digits", [3, 14], tmp_path, solver="sde-dpmsolver++", batch=2, fmt="npz", steps=4,
                eval_batch=1, progress=False)
    got = _samples(tmp_path)
    m = zoo.load("digits")
    for seed in (3, 14):
        den = zoo.guided(m, torch.tensor([seed % 10]), 3.0)
        ref = dp.sample(den, noise(seed, m.shape)[None], "sde-dpmsolver++", order=2, steps=4, t_end=0.0,
                        seed=solver_seed(seed), progress=False).x
        assert np.array_equal(got[seed], ref[0].float().numpy())


def test_manifest_complete_range_and_other_settings(tmp_path, capsys):
    out = str(tmp_path / "out")
    args = ["generate", "--model", "digits", "--steps", "3", "--seeds", "0-5", "--batch", "4", "--eval-batch", "4",
            "--out", out, "--no-progress"]
    assert main(args) == 0
    manifest = read_manifest(out)
    assert manifest["settings"]["solver"] == "dpmsolver++" and manifest["settings"]["steps"] == 3
    assert manifest["seeds"] == "0-5" and manifest["settings"]["dpmsolve"] == dp.__version__
    assert manifest["runs"][-1]["written"] == 6 and done_seeds(out) == set(range(6))
    capsys.readouterr()
    assert main(args) == 0                                               # complete: says so, exit 0
    assert "already in" in capsys.readouterr().out
    with pytest.raises(SystemExit) as info:                             # other settings: refused, one line
        main([*args[:4], "6", *args[5:]])
    err = capsys.readouterr().err
    assert info.value.code == 2 and len(err.strip().splitlines()) == 1
    assert "other settings (steps: 3 there, 6 now)" in err and "--overwrite" in err
    assert main([*args[:4], "6", *args[5:], "--overwrite"]) == 0
    assert read_manifest(out)["settings"]["steps"] == 6 and len(read_manifest(out)["runs"]) == 1
    (Path(out) / "manifest.json").unlink()                              # images without a manifest: refused
    with pytest.raises(SystemExit):
        main(args)
    assert "no manifest.json" in capsys.readouterr().err


def test_cli_argument_errors_are_one_line(tmp_path, capsys, net_file):
    def fails(args, message, code=2):
        with pytest.raises(SystemExit) as info:
            main(["generate", *args, "--out", str(tmp_path / "o")])
        err = capsys.readouterr().err
        assert info.value.code == code and err.startswith("dpmsolve: error: "), err
        assert len(err.strip().splitlines()) == 1 and message in err, err

    fails([], "say what to sample")
    fails(["--model", "digits", "--steps", "0"], "--steps must be >= 1, got 0")
    fails(["--model", "digits", "--seeds", "5-2"], "--seeds")
    fails(["--model", "nope"], "not shipped")
    fails(["--model", "patches", "--guidance", "2"], "unconditional")
    fails(["--model", "digits", "--class", "12"], "0 .. 9, got 12")
    fails(["--model", "digits", "--solver", "nope"], "nope")
    fails(["--model", "digits", "--plan", "x.json", "--steps", "4"], "--plan holds its own")
    fails(["--network", net_file], "shape is needed")
    fails(["--network", "no_such_module_xyz:make", "--shape", "1,2,2"], "cannot import")
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(SystemExit):
        main(["generate", "--model", "digits", "--out", str(blocker)])
    assert "is a file, not a folder" in capsys.readouterr().err


def test_evaluate_streams_the_shipped_metrics(tmp_path, capsys):
    from dpmsolve.evaluate_cli import evaluate_folder
    from dpmsolve.zoo import metrics

    digits = tmp_path / "digits"
    dp.generate("digits", "0-29", digits, upscale=2, **TINY)
    report = evaluate_folder(digits, chunk=7)
    images = []
    for s in range(30):
        from PIL import Image

        with Image.open(digits / f"{s:06d}.png") as im:
            images.append(np.asarray(im)[::2, ::2])
    x = torch.from_numpy(np.stack(images)).double()[:, None] / 127.5 - 1
    assert report.images == 30
    assert report.values["digits-FD"] == pytest.approx(metrics.digits_fd(x.float()), rel=1e-6)
    assert report.values["class accuracy"] == pytest.approx(metrics.class_accuracy(x.float(), torch.arange(30) % 10))
    patches = tmp_path / "patches"
    dp.generate("patches", "0-5", patches, fmt="npz", steps=3, eval_batch=6, progress=False)
    got = evaluate_folder(patches, chunk=4).values["patches distance"]
    with np.load(next(patches.glob("*.npz"))) as shard:
        x = torch.from_numpy(shard["images"]).permute(0, 3, 1, 2).double() / 127.5 - 1
    assert got == pytest.approx(metrics.patches_distance(x), rel=1e-9)
    assert main(["evaluate", str(digits), "--json", str(tmp_path / "m.json")]) == 0
    assert "digits-FD" in capsys.readouterr().out and "class accuracy" in json.loads((tmp_path / "m.json").read_text())
    with pytest.raises(SystemExit) as info:
        main(["evaluate", str(tmp_path / "missing")])
    assert info.value.code == 2 and "does not exist" in capsys.readouterr().err


def test_a_saved_diffusers_pixel_pipeline(tmp_path):
    """An unconditional pipeline folder (DDPMPipeline) runs like a shipped model, the same for any batch size."""
    pytest.importorskip("diffusers")
    from diffusers import DDPMPipeline, DDPMScheduler
    from tiny_pipelines import tiny_unet

    torch.manual_seed(0)
    DDPMPipeline(unet=tiny_unet(), scheduler=DDPMScheduler()).save_pretrained(tmp_path / "pipe")
    for batch in (4, 1):
        dp.generate(str(tmp_path / "pipe"), "0-3", tmp_path / f"b{batch}", solver="sde-dpmsolver++", steps=3,
                    batch=batch, eval_batch=2, fmt="npz", progress=False)
    one, four = _samples(tmp_path / "b1"), _samples(tmp_path / "b4")
    assert all(np.array_equal(one[s], four[s]) and one[s].shape == (3, 8, 8) for s in range(4))
    assert read_manifest(tmp_path / "b4")["settings"]["model"] == "pipeline:pipe"


# ------------------------------------------------------------------------------------------ multi-process

def test_torchrun_two_processes_give_the_same_bytes(tmp_path):
    """``torchrun --nproc_per_node 2 -m dpmsolve generate`` (gloo on CPU) = one process, for a stochastic solver
    at other batch sizes."""
    result = _torchrun(["-m", "dpmsolve", "generate", "--model", "digits", "--solver", "sde-dpmsolver++", "--steps",
                        "4", "--seeds", "0-12", "--batch", "3", "--eval-batch", "4", "--out", "two",
                        "--no-progress"], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("Wrote 13 of 13 images") == 1 and "on 2 processes" in result.stdout
    with _one_thread():
        dp.generate("digits", "0-12", tmp_path / "one", solver="sde-dpmsolver++", batch=13, **TINY)
    assert _pngs(tmp_path / "two") == _pngs(tmp_path / "one") and len(_pngs(tmp_path / "one")) == 13


SCRIPT = '''
import json, sys, numpy as np, torch, torch.distributed as dist
import dpmsolve as dp
from dpmsolve.generate import RankFailure

dist.init_process_group("gloo")
rank = dist.get_rank()
dp.generate("digits", "0-10", "npz", solver="dpmsolver++", steps=4, batch=2, eval_batch=4, fmt="npz",
            progress=False)
schedule = dp.LinearVP()
x0 = torch.randn(300, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
den = dp.wrap_model(lambda x, t: torch.tanh(x + 0.1 * torch.as_tensor(t).reshape(-1, 1)), schedule, "eps",
                    time_input="continuous")
ems = dp.ems.compute(den, x0, n_lambdas=12, batch_size=64, progress=False, group=dist.group.WORLD)
if rank == 0:
    np.savez("ems.npz", l=ems.l, s=ems.s, b=ems.b)
try:
    dp.generate(sys.argv[1], "0-7", "fail", shape=(3, 4, 4), batch=2, steps=2, eval_batch=2, progress=False)
except RankFailure as exc:
    open(f"failure{rank}.txt", "w").write(str(exc))
'''


def test_torchrun_npz_ems_group_and_a_failing_rank(tmp_path, net_file):
    """In one torchrun launch: npz shards equal one process's samples; ems.compute over 2 ranks equals one
    process to round-off; a rank that raises stops both ranks with an error naming it and its cause."""
    (tmp_path / "script.py").write_text(SCRIPT)
    result = _torchrun(["script.py", net_file], tmp_path, GEN_TEST_DIE="1:3:raise")
    assert result.returncode == 0, result.stderr[-3000:]
    with _one_thread():
        dp.generate("digits", "0-10", tmp_path / "ref", solver="dpmsolver++", batch=11, fmt="npz", **TINY)
    two, one = _samples(tmp_path / "npz"), _samples(tmp_path / "ref")
    assert sorted(two) == list(range(11)) and all(np.array_equal(two[s], one[s]) for s in one)
    assert len(list((tmp_path / "npz").glob("shard-*.npz"))) == 6            # batches of 2 over 2 ranks

    schedule = dp.LinearVP()
    x0 = torch.randn(300, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    den = dp.wrap_model(lambda x, t: torch.tanh(x + 0.1 * torch.as_tensor(t).reshape(-1, 1)), schedule, "eps",
                        time_input="continuous")
    ref = dp.ems.compute(den, x0, n_lambdas=12, batch_size=64, progress=False)
    with np.load(tmp_path / "ems.npz") as got:
        for key in ("l", "s", "b"):
            np.testing.assert_allclose(got[key], getattr(ref, key), rtol=1e-9, atol=1e-12)
    for rank in (0, 1):
        text = (tmp_path / f"failure{rank}.txt").read_text()
        assert "rank 1 of 2 failed: ValueError: the test network failed on purpose" in text, text


def test_resume_after_a_kill_makes_only_the_missing_seeds(tmp_path, net_file, capsys):
    """A run killed by SIGKILL midway, then the same command again: only the missing seeds are made, and the
    folder equals an uninterrupted run's; a leftover temporary file is never taken for done."""
    args = ["generate", "--network", net_file, "--shape", "3,4,4", "--steps", "4", "--seeds", "0-19", "--batch",
            "4", "--eval-batch", "4", "--no-progress"]
    killed = subprocess.run([sys.executable, "-m", "dpmsolve", *args, "--out", "out"], cwd=tmp_path,
                            env=_env(GEN_TEST_DIE="0:9:kill"), capture_output=True, text=True, timeout=120)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    out = tmp_path / "out"
    first = {p.name: p.stat().st_mtime_ns for p in out.glob("*.png")}
    assert len(first) == 8                                        # 2 batches of 4 (4 calls each), killed in the 3rd
    (out / ".000009.png.12345.tmp").write_bytes(b"\x89PNG half")  # as if killed while writing
    assert 9 not in done_seeds(out)
    assert main([*args, "--out", str(out)]) == 0
    assert "Wrote 12 of 20 images (8 were already there)" in capsys.readouterr().out
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.png") if p.name in first} == first
    assert not list(out.glob(".*.tmp"))
    assert main([*args, "--out", str(tmp_path / "whole")]) == 0
    assert _pngs(out) == _pngs(tmp_path / "whole") and len(_pngs(out)) == 20
    runs = read_manifest(out)["runs"]
    assert [r["written"] for r in runs] == [12]                   # the killed run never finished


def test_a_dying_rank_is_named(tmp_path, net_file):
    """Two processes started the way SLURM-like launchers do (RANK, WORLD_SIZE, MASTER_ADDR/PORT); rank 1 is
    killed midway: rank 0 stops with one line naming it, and what was written is complete."""
    port = str(_free_port())
    procs = []
    for rank in (0, 1):
        env = _env(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=port,
                   GEN_TEST_DIE="1:5:kill")
        procs.append(subprocess.Popen([sys.executable, "-m", "dpmsolve", "generate", "--network", net_file,
                                       "--shape", "3,4,4", "--steps", "2", "--seeds", "0-39", "--batch", "2",
                                       "--eval-batch", "2", "--out", "out", "--no-progress", "--timeout", "60"],
                                      cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    try:
        out0, err0 = procs[0].communicate(timeout=120)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        procs[1].communicate()
    assert procs[1].returncode == -signal.SIGKILL
    assert procs[0].returncode == 1, err0[-2000:]
    line = [s for s in err0.splitlines() if s.startswith("dpmsolve: error:")]
    assert len(line) == 1 and f"rank 1 (pid {procs[1].pid}) of 2 died" in line[0], err0[-2000:]
    from PIL import Image

    written = list((tmp_path / "out").glob("*.png"))
    assert 0 < len(written) < 40 and not list((tmp_path / "out").glob(".*.tmp"))
    for path in written:
        with Image.open(path) as im:
            im.load()
