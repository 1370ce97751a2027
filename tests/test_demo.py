"""`dpmsolve demo` runs end to end (reduced mixture sample) and writes its PNGs."""

import pytest
import torch

from dpmsolve.cli import main


def test_demo_runs_and_writes_pngs(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    torch.set_default_dtype(torch.float32)  # as a user runs it
    assert main(["demo", "--samples", "50", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "Shipped digits model" in out and "Analytic 8-mode Gaussian mixture" in out
    assert (tmp_path / "demo.png").stat().st_size > 10_000
    assert (tmp_path / "demo_mixture.png").stat().st_size > 10_000
    # the table's rows: every solver at NFE 20 is far closer to the reference than at NFE 5 for 2M
    line = next(row for row in out.splitlines() if row.startswith("| DPM-Solver++ 2M"))
    errs = [float(v) for v in line.strip("| \n").split("|")[1:]]
    assert errs[2] < 0.2 * errs[0]
