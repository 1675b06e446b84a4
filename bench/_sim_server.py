"""Run the simulated archive's server in its own process (so its CPU is not the client's)."""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def start_sim_server(root: Path, *, faults: str = "none") -> Iterator[str]:
    """``streamer sim serve --root ROOT`` on a free loopback port; yields its base URL."""
    command = [sys.executable, "-m", "streamer.cli", "sim", "serve", "--root", str(root), "--faults", faults]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert process.stdout is not None
        line = process.stdout.readline().strip()
        if not line.startswith("serving "):
            raise RuntimeError(f"the simulator did not start: {line!r}")
        yield line.removeprefix("serving ")
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
