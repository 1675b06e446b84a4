"""Full-size (3080 x 3072 quadrants) end-to-end runs: the demo, and a two-CCD night under a tight budget."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from e2e import NIGHT, DiskSampler, backfill_args, catalogues, config_for, run_cli, status_json, store_of
from streamer.demo import serve_archive
from streamer.sim.generate import generate_night

pytestmark = [pytest.mark.slow, pytest.mark.timeout(2700)]


def test_demo_full_size(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "streamer.cli", "demo", "--workdir", str(tmp_path)],
        capture_output=True, text=True, timeout=1800,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "aperture catalogues under" in result.stdout
    config = tmp_path / "config.toml"
    report = status_json(config)
    assert report["budget"]["used_bytes"] <= report["budget"]["budget_bytes"]
    assert report["jobs"]["exposure"] == {"done": 8}
    assert len(catalogues(tmp_path / "store")) == 8
    raw_volume = sum(p.stat().st_size for p in (tmp_path / "archive" / "raw").rglob("*.fits.fz"))
    assert report["budget"]["budget_bytes"] < raw_volume


def test_two_ccd_night_tight_budget_identical_to_unlimited(tmp_path: Path) -> None:
    archive = tmp_path / "archive"
    generate_night(
        archive, NIGHT, ccds=(13, 14), n_exposures=16, flats_per_led=3, n_biases=16, seed=11, shape="full", jobs=2,
        filters=("zg", "zr"), flat_filters=("zg", "zr"),
    )  # fmt: skip
    raw_volume = sum(p.stat().st_size for p in (archive / "raw").rglob("*.fits.fz"))
    with serve_archive(archive) as url:
        unlimited = config_for(tmp_path, archive, url, budget=10 * raw_volume, name="unlimited.toml")
        first = run_cli(unlimited, *backfill_args(), timeout=1800)
        assert first.returncode == 0, first.stdout + first.stderr
        minimum = status_json(unlimited)["minimum_budget_bytes"]
        budget = max(raw_volume // 4, int(1.1 * minimum))
        tight = config_for(tmp_path, archive, url, budget=budget, name="tight.toml")
        store_of(tight).mkdir()
        with DiskSampler(store_of(tight)) as sampler:
            second = run_cli(tight, *backfill_args(), timeout=1800)
    assert second.returncode == 0, second.stdout + second.stderr
    assert budget < raw_volume
    assert sampler.peak <= budget, f"disk use peaked at {sampler.peak} B over the budget of {budget} B"
    reference = catalogues(store_of(unlimited))
    assert len(reference) == 32
    assert catalogues(store_of(tight)) == reference
