"""`dpmsolve demo` runs end to end (reduced mixture and patches samples) and writes its PNGs."""

import pytest
import torch

from dpmsolve.cli import main


def test_demo_runs_and_writes_pngs(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    torch.set_default_dtype(torch.float32)  # as a user runs it
    threads = torch.get_num_threads()
    assert main(["demo", "--mixture-samples", "50", "--patches", "4", "--out", str(tmp_path)]) == 0
    assert torch.get_num_threads() == threads  # the demo's single thread is restored
    captured = capsys.readouterr()
    out = captured.out
    # progress on stderr (not a terminal here), one line per model and solver, and the elapsed time at the end
    progress = captured.err.splitlines()
    assert all(line.startswith("demo [") for line in progress) and len(progress) >= 20
    assert any("digits: reference solution" in line for line in progress)
    assert any("patches: DPM-Solver++ 2M" in line for line in progress)
    assert any("mixture: DDIM" in line for line in progress)
    assert out.rstrip().splitlines()[-1].startswith("Done in ")
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


def test_demo_help_says_what_the_counts_count(capsys):
    with pytest.raises(SystemExit):
        main(["demo", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "--mixture-samples N" in out and "8-mode Gaussian mixture" in out and "(default: 1000)" in out
    assert "samples drawn from the patches model (default: 20)" in out
