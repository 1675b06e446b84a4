"""Configuration loading: defaults, sizes, and one-line errors for malformed files."""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from streamer.config import load_config, parse_size
from streamer.errors import ConfigError, UsageError

REPO = Path(__file__).resolve().parents[1]


def test_minimal_config_is_valid_and_creates_storage(minimal_config: Path, tmp_path: Path) -> None:
    cfg = load_config(minimal_config)
    assert cfg.storage.budget == 10 * 10**9
    assert cfg.storage.ledger_path == tmp_path / "store" / "ledger.sqlite"
    assert (tmp_path / "store").is_dir()
    assert cfg.detrend.overscan_columns == (5, 25)
    assert cfg.detrend.bias_skip_first == 10
    assert cfg.photometry.radii == tuple(float(r) for r in range(3, 13))
    assert cfg.photometry.mask_reject_bits == 6141
    assert cfg.archive.max_connections == 4
    assert cfg.compute.executor == "local"


def test_the_in2p3_layout_defaults_to_the_focal_plane_flat(minimal_config_text: str, tmp_path: Path) -> None:
    """IN2P3 production flatfields with the focal-plane flat (fp_flatfield: True); a stated choice stands."""
    from streamer.config import config_from_dict

    base = tomllib.loads(minimal_config_text)
    assert config_from_dict(base).detrend.flat_normalisation == "ccd"
    in2p3 = {**base, "photometry": {**base.get("photometry", {}), "layout": "in2p3"}}
    assert config_from_dict(in2p3).detrend.flat_normalisation == "focalplane"
    stated = {**in2p3, "detrend": {**base.get("detrend", {}), "flat_normalisation": "ccd"}}
    assert config_from_dict(stated).detrend.flat_normalisation == "ccd"


def test_documented_example_loads(tmp_path: Path) -> None:
    cfg = load_config(REPO / "config.toml", create_dirs=False)
    assert cfg.consumers[0].keep == ("apcat",)
    assert cfg.storage.high_watermark == 0.9


@pytest.mark.parametrize(
    ("text", "size"),
    [("500 GB", 500 * 10**9), ("2 TiB", 2 * 2**40), ("123456789 B", 123456789), ("1.5 kB", 1500), ("3MiB", 3 * 2**20)],
)
def test_sizes(text: str, size: int) -> None:
    assert parse_size(text) == size


def test_config_hash_is_stable_and_sensitive(minimal_config: Path, minimal_config_text: str, tmp_path: Path) -> None:
    first = load_config(minimal_config).config_hash()
    assert load_config(minimal_config).config_hash() == first
    other = tmp_path / "other.toml"
    other.write_text(minimal_config_text + "\n[detrend]\nbias_skip_first = 3\n")
    assert load_config(other).config_hash() != first


# Each case: (what is changed in the minimal configuration, the key the error must name).
BROKEN = [
    ('budget = "10 GB"', 'budget = "10 GX"', "storage.budget"),
    ('budget = "10 GB"', 'budget = "-5 GB"', "storage.budget"),
    ('budget = "10 GB"', "budget = 0", "storage.budget"),
    ('budget = "10 GB"', "", "storage.budget"),
    ("[storage]\nroot", "[storage]\nhigh_watermark = 0.5\nlow_watermark = 0.7\nroot", "storage.low_watermark"),
    ("[storage]\nroot", "[storage]\nhigh_watermark = 1.5\nroot", "storage.high_watermark"),
    ("[storage]\nroot", "[storage]\nbugdet = 3\nroot", "storage.bugdet"),
    ("[storage]\nroot", "[storage]\nroot = 7\nrooot", "storage.rooot"),
    ('root = "', 'root = 7 # "', "storage.root"),
    ("[storage]\nroot", "[storage]\nrot", "storage.rot"),
    ('budget = "10 GB"', 'budget = "10 GB"\n[storage.x]', "storage.x"),
    ('catalog_dir = "', 'catalogue_dir = "', "photometry.catalogue_dir"),
    ("", '\n[compute]\nexecutor = "slurm"\n', "compute.executor"),
    ("", "\n[compute]\nworkers = 0\n", "compute.workers"),
    ("", '\n[compute]\nexecutor = "dask"\n', "compute.scheduler"),
    ("", '\n[archive]\nbase_url = "ftp://irsa"\n', "archive.base_url"),
    ("", '\n[archive]\nmax_connections = "four"\n', "archive.max_connections"),
    ("", "\n[detrend]\noverscan_columns = [25, 5]\n", "detrend.overscan_columns"),
    ("", "\n[detrend]\noverscan_columns = [5, 31]\n", "detrend.overscan_columns"),
    ("", '\n[detrend]\nflat_normalisation = "global"\n', "detrend.flat_normalisation"),
    ("", "\n[detrend]\nbias_skip_first = 2.5\n", "detrend.bias_skip_first"),
    ("", '\n[backfill]\nranges = [["2020-09-31", "2020-10-02"]]\n', "backfill.ranges[0][0]"),
    ("", '\n[backfill]\nranges = [["2020-10-05", "2020-10-02"]]\n', "backfill.ranges[0]"),
    ("", '\n[[consumers]]\nname = "a"\nkeep = ["raws"]\n', "consumers[0].keep[0]"),
    ("", '\n[[consumers]]\nname = "a"\nkeep = ["apcat"]\nstart = "2020/01/01"\n', "consumers[0].start"),
    ("", '\n[[consumers]]\nkeep = ["apcat"]\n', "consumers[0].name"),
    ("", '\n[archive.auth]\nusername = "u"\n', "archive.auth"),
    ("", "\n[photometry.extra]\nx = 1\n", "photometry.extra"),
    ("", "\n[nonsense]\nx = 1\n", "nonsense"),
]


@pytest.mark.parametrize(("old", "new", "key"), BROKEN, ids=[b[2] + ":" + b[1][:20] for b in BROKEN])
def test_malformed_config_names_the_key(minimal_config_text: str, tmp_path: Path, old: str, new: str, key: str) -> None:
    text = minimal_config_text.replace(old, new, 1) if old else minimal_config_text + new
    assert text != minimal_config_text
    path = tmp_path / "broken.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(str(path) + ": " + key + " = ")
    assert "expected" in message


def test_bad_targets_csv_is_one_line(minimal_config_text: str, tmp_path: Path) -> None:
    csv_path = tmp_path / "sn.csv"
    csv_path.write_text("ra,dec,radius_deg\n10.0,north,0.01\n")
    path = tmp_path / "c.toml"
    path.write_text(minimal_config_text + f'\n[[consumers]]\nname = "sn"\nkeep = ["sciimg"]\ntargets = "{csv_path}"\n')
    with pytest.raises(UsageError, match=r"sn\.csv:2: .*expected numbers"):
        load_config(path)


def test_invalid_toml_is_a_usage_error(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text("[storage\nroot=")
    with pytest.raises(UsageError, match="not valid TOML"):
        load_config(path)


def _streamer(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "streamer.cli", *args],
        cwd=cwd, capture_output=True, text=True, env={**os.environ, **(env or {})}, timeout=120,
    )  # fmt: skip


def test_cli_reports_config_error_in_one_line_exit_2(minimal_config_text: str, tmp_path: Path) -> None:
    path = tmp_path / "broken.toml"
    path.write_text(minimal_config_text.replace('"10 GB"', '"ten GB"'))
    result = _streamer("--config", str(path), "status", cwd=tmp_path)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().count("\n") == 0
    assert "storage.budget" in result.stderr


def test_config_found_from_environment_then_cwd(minimal_config: Path, tmp_path: Path) -> None:
    from streamer.config import find_config

    os.environ.pop("STREAMER_CONFIG", None)
    assert find_config("x.toml") == Path("x.toml")
    result = _streamer("status", cwd=tmp_path / "store" if (tmp_path / "store").exists() else tmp_path,
                       env={"STREAMER_CONFIG": str(minimal_config)})  # fmt: skip
    assert "no configuration" not in result.stderr
    empty = tmp_path / "empty"
    empty.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "STREAMER_CONFIG"}
    result = subprocess.run([sys.executable, "-m", "streamer.cli", "status"], cwd=empty, env=env,
                            capture_output=True, text=True, timeout=120)  # fmt: skip
    assert result.returncode == 2
    assert "no configuration" in result.stderr
