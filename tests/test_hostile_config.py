"""Hostile configuration: every credential problem and a malformed base URL are one line, exit 2."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

from streamer.archive.auth import AuthError, load_credentials
from streamer.cli import main
from streamer.config import AuthConfig

CONFIG = """\
[storage]
root = "{root}"
budget = "10 GB"

[archive]
base_url = "{base_url}"
max_attempts = 1
{auth}
[compute]
workers = 1

[photometry]
catalog_dir = "{catalog}"
"""


def _write_config(tmp_path: Path, *, auth: str = "", base_url: str = "http://127.0.0.1:9") -> Path:
    root = tmp_path / "store"
    root.mkdir(exist_ok=True)
    config = tmp_path / "config.toml"
    config.write_text(CONFIG.format(root=root, catalog=tmp_path / "refcat", auth=auth, base_url=base_url))
    return config


def _run_cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, list[str]]:
    code = main(argv)
    captured = capsys.readouterr()
    assert "Traceback" not in captured.out + captured.err
    return code, captured.err.strip().splitlines()


def _missing(path: Path) -> None:
    pass


def _group_readable(path: Path) -> None:
    path.write_text("hunter2\n")
    path.chmod(0o640)


def _directory(path: Path) -> None:
    path.mkdir(mode=0o700)


def _not_utf8(path: Path) -> None:
    path.write_bytes(b"\xff\xfe\xfa hunter2\n")
    path.chmod(0o600)


def _fifo(path: Path) -> None:
    os.mkfifo(path, 0o600)


def _empty(path: Path) -> None:
    path.write_text("\n")
    path.chmod(0o600)


def _symlink(path: Path) -> None:
    real = path.with_name("real-pw")
    real.write_text("hunter2\n")
    real.chmod(0o600)
    path.symlink_to(real)


PASSWORD_FILES: dict[str, tuple[Callable[[Path], None], str]] = {
    "missing": (_missing, "No such file"),
    "group_readable": (_group_readable, "group or others"),
    "directory": (_directory, "not a regular file"),
    "not_utf8": (_not_utf8, "not UTF-8"),
    "fifo": (_fifo, "not a regular file"),
    "empty": (_empty, "empty"),
    "symlink": (_symlink, "not a regular file"),
}


@pytest.mark.timeout(120)
@pytest.mark.parametrize("problem", sorted(PASSWORD_FILES))
def test_a_bad_password_file_is_one_line_exit_2(problem: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    make, expected = PASSWORD_FILES[problem]
    password_file = tmp_path / "irsa-password"
    make(password_file)
    auth = f'[archive.auth]\nusername = "ann"\npassword_file = "{password_file}"\n'
    config = _write_config(tmp_path, auth=auth)
    code, lines = _run_cli(["--config", str(config), "backfill", "--start", "2020-09-24", "--end", "2020-09-24"], capsys)
    assert code == 2, lines
    assert len(lines) == 1 and str(password_file) in lines[0] and expected in lines[0], lines


@pytest.mark.timeout(120)
def test_an_unset_password_variable_is_one_line_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("STREAMER_TEST_NO_SUCH_PW", raising=False)
    auth = '[archive.auth]\nusername = "ann"\npassword_env = "STREAMER_TEST_NO_SUCH_PW"\n'
    config = _write_config(tmp_path, auth=auth)
    code, lines = _run_cli(["--config", str(config), "backfill", "--start", "2020-09-24", "--end", "2020-09-24"], capsys)
    assert code == 2 and len(lines) == 1 and "STREAMER_TEST_NO_SUCH_PW" in lines[0], lines


def test_an_unreadable_password_file_names_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "pw"
    path.write_text("hunter2\n")
    path.chmod(0o600)
    real_open = os.open

    def refusing_open(name: object, flags: int, *args: object, **kwargs: object) -> int:
        if str(name) == str(path):
            raise PermissionError(13, "Permission denied")
        return real_open(name, flags, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "open", refusing_open)  # root reads a mode-000 file, so refuse it here
    with pytest.raises(AuthError, match="pw.*Permission denied") as caught:
        load_credentials(AuthConfig(username="ann", password_file=path))
    assert caught.value.exit_code == 2


@pytest.mark.parametrize(
    "base_url", ["http://host:notaport", "http://host:99999", "http://:80", "http://a..b", "http://host:0", "http://[zz]"]
)
def test_a_malformed_base_url_is_refused_at_load(base_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = _write_config(tmp_path, base_url=base_url)
    code, lines = _run_cli(["--config", str(config), "status"], capsys)
    assert code == 2 and len(lines) == 1 and "archive.base_url" in lines[0], lines


def test_a_targets_csv_with_a_bom_is_read(minimal_config_text: str, tmp_path: Path) -> None:
    from streamer.config import load_config

    csv_path = tmp_path / "excel.csv"
    csv_path.write_bytes("ra,dec,radius_deg\r\n10.5,-20.25,0.01\r\n".encode("utf-8-sig"))
    path = tmp_path / "c.toml"
    path.write_text(minimal_config_text + f'\n[[consumers]]\nname = "sn"\nkeep = ["sciimg"]\ntargets = "{csv_path}"\n')
    (consumer,) = load_config(path).consumers
    assert [(t.ra, t.dec, t.radius_deg) for t in consumer.targets] == [(10.5, -20.25, 0.01)]


@pytest.mark.parametrize("reference", ["$STREAMER_TEST_UNSET_ROOT", "${STREAMER_TEST_UNSET_ROOT}"])
def test_an_unset_variable_in_a_path_is_one_line_exit_2(
    reference: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("STREAMER_TEST_UNSET_ROOT", raising=False)
    monkeypatch.chdir(tmp_path)
    config = tmp_path / "config.toml"
    config.write_text(
        CONFIG.format(root=f"{reference}/store", catalog=tmp_path / "refcat", auth="", base_url="http://127.0.0.1:9")
    )
    before = sorted(p.name for p in tmp_path.iterdir())
    code, lines = _run_cli(["--config", str(config), "status"], capsys)
    assert code == 2 and len(lines) == 1, lines
    assert "storage.root" in lines[0] and "STREAMER_TEST_UNSET_ROOT" in lines[0] and "not set" in lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == before
