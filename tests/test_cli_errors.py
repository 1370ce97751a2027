"""The command line reports user errors as one line (``dpmsolve: error: ...``) with a non-zero exit, checks output
folders before computing, names the extra to install for a missing optional dependency, and only claims files
it wrote."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import warnings

import pytest

from dpmsolve.cli import main, quiet_third_party


def _fails(capsys, args, message, code=2):
    with pytest.raises(SystemExit) as info:
        main(args)
    err = capsys.readouterr().err
    assert info.value.code == code, err
    assert len(err.strip().splitlines()) == 1 and err.startswith("dpmsolve: error: "), err
    assert message in err and "Traceback" not in err
    return err


@pytest.mark.parametrize("command", [
    ["sample", "--model", "digits"],
    ["demo", "--mixture-samples", "10"],
    ["bench", "--problems", "gaussian", "--no-peers"],
    ["tune", "--model", "digits"],
])
def test_output_folder_is_checked_before_computing(command, tmp_path, capsys, monkeypatch):
    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    _fails(capsys, [*command, "--out", str(blocker)], "is a file, not a folder")
    _fails(capsys, [*command, "--out", str(blocker / "sub")], f"cannot create the folder, {blocker} is a file")
    # an unwritable folder (simulated: root may write anywhere)
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: False if str(path) == str(tmp_path) else
                        real_access(path, mode))
    _fails(capsys, [*command, "--out", str(tmp_path / "new")], f"{tmp_path} is not writable")
    assert not (tmp_path / "new").exists()


def test_argument_errors_are_one_line_and_name_the_value(tmp_path, capsys):
    _fails(capsys, ["demo", "--mixture-samples", "0", "--out", str(tmp_path)], "--mixture-samples must be >= 1, got 0")
    _fails(capsys, ["demo", "--patches", "-3", "--out", str(tmp_path)], "--patches must be >= 2, got -3")
    _fails(capsys, ["bench", "--samples", "0", "--out", str(tmp_path)], "--samples must be >= 1, got 0")
    _fails(capsys, ["bench", "--nfes", "5", "1", "--out", str(tmp_path)], "--nfes must be >= 2, got 1")
    _fails(capsys, ["tune", "--model", "nope", "--out", str(tmp_path)], "--model must be one of")
    _fails(capsys, ["tune", "--model", "digits", "--nfe", "1", "--out", str(tmp_path)], "--nfe must be >= 2, got 1")
    _fails(capsys, ["tune", "--model", "digits", "--samples", "4", "--out", str(tmp_path)], "--samples must be >= 8")
    for option, value in (("--steps", "0"), ("--batch", "-2"), ("--upscale", "0")):
        _fails(capsys, ["sample", "--model", "digits", option, value, "--out", str(tmp_path)],
               f"{option} must be >= 1, got {value}")
    _fails(capsys, ["sample", "--model", "digits", "--label", "10", "--out", str(tmp_path)], "got 10")
    _fails(capsys, ["sample", "--model", "digits", "--guidance", "nan", "--out", str(tmp_path)],
           "--guidance must be a finite number, got nan")
    _fails(capsys, ["sample", "--model", "nope", "--out", str(tmp_path)], "shipped models: digits")
    bad = tmp_path / "bad.plan.json"
    bad.write_text("{not json")
    _fails(capsys, ["sample", "--model", "digits", "--plan", str(bad), "--out", str(tmp_path)], f"--plan {bad}")
    _fails(capsys, ["bench", "--problems", "nope", "--out", str(tmp_path)], "Unknown lab problem", code=1)


def _raiser(exc):
    def load(name):
        raise exc
    return load


@pytest.mark.parametrize("make", [
    lambda: ValueError("a bad value\nover two lines"),
    lambda: __import__("dpmsolve").ems.EMSError("statistics made for another schedule"),
    lambda: __import__("dpmsolve").PlanError("plan made for another model"),
    lambda: __import__("dpmsolve").NonFiniteError("NaN or Inf after 3 steps"),
    lambda: PermissionError(13, "Permission denied", "/somewhere"),
    lambda: ModuleNotFoundError("No module named 'sklearn'", name="sklearn"),
], ids=["ValueError", "EMSError", "PlanError", "NonFiniteError", "OSError", "missing-extra"])
def test_user_errors_inside_a_command_are_one_line(make, tmp_path, capsys, monkeypatch):
    from dpmsolve import zoo

    exc = make()
    monkeypatch.setattr(zoo, "load", _raiser(exc))
    err = _fails(capsys, ["sample", "--model", "digits", "--out", str(tmp_path)], "", code=1)
    if isinstance(exc, ModuleNotFoundError):
        assert 'needs scikit-learn, which is not installed: pip install "dpmsolve[lab]"' in err
    else:
        assert " ".join(str(exc).split()) in err


def test_internal_errors_keep_their_traceback(tmp_path, monkeypatch):
    from dpmsolve import zoo

    monkeypatch.setattr(zoo, "load", _raiser(KeyError("internal")))
    with pytest.raises(KeyError):
        main(["sample", "--model", "digits", "--out", str(tmp_path)])
    monkeypatch.setattr(zoo, "load", _raiser(ModuleNotFoundError("No module named 'dpmsolve.nope'",
                                                                 name="dpmsolve.nope")))
    with pytest.raises(ModuleNotFoundError):
        main(["sample", "--model", "digits", "--out", str(tmp_path)])


# A base install (no extras), simulated: Pillow, scikit-learn and matplotlib cannot be imported.
BASE_INSTALL = textwrap.dedent("""
    import json, sys
    for name in ("PIL", "sklearn", "matplotlib"):
        sys.modules[name] = None
    from dpmsolve.cli import main

    out = sys.argv[1]
    results = {}
    for key, args in [
        ("sample", ["sample", "--model", "digits", "--steps", "2", "--out", out + "/samples"]),
        ("demo", ["demo", "--out", out + "/demo"]),
        ("bench", ["bench", "--no-peers", "--out", out + "/bench"]),
        ("bench-gaussian", ["bench", "--no-peers", "--problems", "gaussian", "--nfes", "3", "--samples", "4",
                            "--out", out + "/bench"]),
    ]:
        try:
            results[key] = main(args)
        except SystemExit as exc:
            results[key] = exc.code
    print("RESULTS " + json.dumps(results))
""")


def test_base_install_names_the_extra_and_claims_only_written_files(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", BASE_INSTALL, str(tmp_path)], capture_output=True, text=True,
                          env=env, timeout=300)
    assert "Traceback" not in proc.stderr, proc.stderr
    results = json.loads(proc.stdout.split("RESULTS ")[-1])
    assert results == {"sample": 1, "demo": 1, "bench": 1, "bench-gaussian": 0}, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("dpmsolve: error: ")]
    assert len(errors) == 3, proc.stderr
    assert "writing the PNG images needs Pillow, which is not installed: pip install pillow" in errors[0]
    assert 'needs scikit-learn, which is not installed: pip install "dpmsolve[lab]"' in errors[1]
    assert "digits-kde problem needs scikit-learn" in errors[2] and "--problems gaussian" in errors[2]
    assert not (tmp_path / "samples").exists() and not (tmp_path / "demo").exists()
    # the bench that ran wrote no PNG and says so, claiming only the files it wrote
    assert sorted(p.name for p in (tmp_path / "bench").iterdir()) == ["accuracy.json", "accuracy.md"]
    wrote = next(line for line in proc.stdout.splitlines() if line.startswith("Wrote "))
    assert "accuracy.md" in wrote and "accuracy.json" in wrote and "png" not in wrote
    assert 'no plot: accuracy.png needs matplotlib, which is not installed: pip install "dpmsolve[plot]"' in proc.stdout
    # progress lines on stderr although it is not a terminal, one per configuration
    progress = [line for line in proc.stderr.splitlines() if line.startswith("bench [")]
    assert any("gaussian (1/1): reference solution" in line for line in progress)
    assert sum("gaussian: dpmsolve" in line for line in progress) >= 10


def test_demo_without_matplotlib_suggests_no_plot(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    _fails(capsys, ["demo", "--out", str(tmp_path / "demo")], "pass --no-plot", code=1)
    assert not (tmp_path / "demo").exists()


def test_quiet_third_party_is_scoped(capfd):
    import logging

    logger = logging.getLogger("diffusers.some_module")
    env, level = os.environ.get("DIFFUSERS_VERBOSITY"), logging.getLogger("diffusers").level
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with quiet_third_party():
            warnings.warn("deprecated", FutureWarning)
            warnings.warn("deprecated", DeprecationWarning)
            logger.warning("the config attributes {'x': 1} were passed but are not expected")
        assert not caught
        warnings.warn("deprecated", FutureWarning)   # restored after the block
        assert len(caught) == 1
    assert "config attributes" not in capfd.readouterr().err
    assert os.environ.get("DIFFUSERS_VERBOSITY") == env and logging.getLogger("diffusers").level == level


def test_version_and_python_m(capsys):
    from dpmsolve import __version__

    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0 and capsys.readouterr().out.strip() == f"dpmsolve {__version__}"
    proc = subprocess.run([sys.executable, "-m", "dpmsolve", "demo", "--help"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0 and "--mixture-samples" in proc.stdout and "(default: 1000)" in proc.stdout
    assert "Gaussian mixture" in proc.stdout and proc.stdout.startswith("usage: dpmsolve demo")
