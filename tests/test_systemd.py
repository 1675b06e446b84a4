"""The systemd units: they verify with systemd-analyze, and say what the service needs."""

from __future__ import annotations

import configparser
import shutil
import socket
import subprocess
from pathlib import Path

import pytest

from streamer.service.systemd import Notifier

UNITS = Path(__file__).resolve().parents[1] / "systemd"


def _unit(name: str) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read(UNITS / name)
    return parser


def test_daemon_unit_settings() -> None:
    service = _unit("streamer.service")["Service"]
    assert service["Type"] == "notify"
    assert service["Restart"] == "on-failure"
    assert service["RestartPreventExitStatus"] == "2"
    assert service["KillMode"] == "mixed"
    assert int(service["WatchdogSec"]) > 0
    for key in ("ProtectSystem", "NoNewPrivileges", "PrivateTmp", "ReadWritePaths", "LoadCredential", "User"):
        assert service[key]


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
@pytest.mark.parametrize("name", ["streamer.service", "streamer-backfill@2020-09-01_2020-09-30.service"])
def test_units_verify(tmp_path: Path, name: str) -> None:
    source = "streamer-backfill@.service" if "@" in name else name
    text = (UNITS / source).read_text().replace("/opt/ztf-streamer/.venv/bin/streamer", "/bin/true")
    (tmp_path / name).write_text(text)
    result = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", "--recursive-errors=no", str(tmp_path / name)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    problems = [line for line in (result.stdout + result.stderr).splitlines() if line.strip()]
    assert result.returncode == 0 and not problems, problems


def test_notifier_sends_datagrams(tmp_path: Path) -> None:
    address = str(tmp_path / "notify")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as server:
        server.bind(address)
        server.settimeout(5)
        notifier = Notifier({"NOTIFY_SOCKET": address, "WATCHDOG_USEC": "4000000"})
        assert notifier.watchdog_interval_s == 2.0
        notifier.ready("started")
        assert server.recv(1024) == b"READY=1\nSTATUS=started"
        notifier.watchdog()
        assert server.recv(1024) == b"WATCHDOG=1"


def test_notifier_is_silent_without_systemd() -> None:
    notifier = Notifier({})
    assert not notifier.enabled and notifier.watchdog_interval_s is None
    notifier.ready("nothing happens")
