"""The fused CPU kernels' build: a first one says so, and one that was killed must not stall later ones."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
from torch.utils import cpp_extension

from sb3_tdmpc.common import cpu_kernels

pytestmark = pytest.mark.skipif(cpu_kernels.fcntl is None, reason="needs POSIX flock")


def test_a_killed_builds_lock_file_is_removed(tmp_path, monkeypatch):
    # torch's loader would wait on this file forever.
    seen = {}

    def fake_load(**kwargs):
        seen["directory"] = kwargs["build_directory"]
        seen["lock left"] = (tmp_path / seen["directory"] / "lock").exists()

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    monkeypatch.setattr(cpp_extension, "load", fake_load)
    assert cpu_kernels._build()
    (tmp_path / seen["directory"] / "lock").touch()
    with pytest.warns(UserWarning, match="did not finish"):
        assert cpu_kernels._build()
    assert seen["directory"].startswith(str(tmp_path))
    assert not seen["lock left"]


def test_a_first_build_says_so_and_a_built_one_is_quiet(tmp_path, monkeypatch, capsys):
    # The build takes minutes: without a word, a first TDMPC(...) would seem to hang.
    def fake_load(**kwargs):
        (Path(kwargs["build_directory"]) / f"{kwargs['name']}.so").touch()

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    monkeypatch.setattr(cpp_extension, "load", fake_load)
    assert cpu_kernels._build()
    assert "building its fused CPU kernels" in capsys.readouterr().err
    assert cpu_kernels._build()
    assert capsys.readouterr().err == ""


def test_a_build_in_progress_is_waited_for(tmp_path):
    # Another process holds the build (its flock and torch's lock file) for a moment: this one waits
    # for it instead of taking its lock file for a leftover.
    holder = textwrap.dedent(
        f"""
        import fcntl, pathlib, sys, time
        directory = pathlib.Path({str(tmp_path)!r})
        with open(directory / "sb3_tdmpc.lock", "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            (directory / "lock").touch()
            print("building", flush=True)
            time.sleep(1.0)
            (directory / "lock").unlink()
        """
    )
    process = subprocess.Popen([sys.executable, "-c", holder], stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline().strip() == "building"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a warning here would mean the live build's lock file was removed
        with cpu_kernels._exclusive_build(tmp_path):
            assert not (tmp_path / "lock").exists()  # the holder removed it before letting go
    process.communicate()
    assert process.returncode == 0
