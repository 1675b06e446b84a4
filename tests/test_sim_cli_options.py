"""`streamer sim generate` options that reach generate_night: bad values are one line, exit 2."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.parametrize(("option", "value", "expected"), [("--pocket", "v9", "pocket"), ("--filters", "zg,zq", "filters")])
def test_a_bad_simulator_option_is_one_line(tmp_path: Path, option: str, value: str, expected: str) -> None:
    command = [sys.executable, "-m", "streamer.cli", "sim", "generate", "--out", str(tmp_path / "a"), "--night",
               "2020-09-24", "--shape", "small", "--exposures", "1", option, value]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1 and expected in result.stderr and "Traceback" not in result.stderr
