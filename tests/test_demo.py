"""`dpmsolve demo` runs end to end (reduced mixture and patches samples) and writes its PNGs."""

import pytest
import torch

from dpmsolve.cli import main


def test_demo_runs_and_writes_pngs(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    torch.set_default_dtype(torch.float32)  # as a user runs it
    threads = torch.get_num_threads()
    assert main(["demo", "--samples", "50", "--patches", "4", "--out", str(tmp_path)]) == 0
    assert torch.get_num_threads() == threads  # the demo's single thread is restored
    out = capsys.readouterr().out
    assert "Shipped digits model" in out and "Analytic 8-mode Gaussian mixture" in out
    assert "Shipped patches model (4 patches" in out and "patches distance" in out
    for name in ("demo.png", "demo_patches.png", "demo_mixture.png"):
        assert (tmp_path / name).stat().st_size > 10_000, name
    # the table's rows: every solver at NFE 20 is far closer to the reference than at NFE 5 for 2M
    line = next(row for row in out.splitlines() if row.startswith("| DPM-Solver++ 2M"))
    errs = [float(v) for v in line.strip("| \n").split("|")[1:]]
    assert errs[2] < 0.2 * errs[0]
    # quality columns: the digits' class accuracy and digits-FD, with real data and blurred noise for scale
    assert "| accuracy / digits-FD |" in out and "| distance |" in out
    held_out = [row for row in out.splitlines() if row.startswith("| held-out data")]
    assert len(held_out) == 2 and held_out[0].split("|")[2].strip().startswith("100%")
