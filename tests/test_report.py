"""``streamer report``: a small simulated night backfilled with ``[report] after_night``, its figures'
numbers checked against the simulator's truth, the catalogues and the ledger (each read here directly)."""

from __future__ import annotations

import contextlib
import json
import re
import sqlite3
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest
from astropy.io import fits

from e2e import NIGHT, backfill_args, config_for, run_cli, store_of
from streamer.demo import serve_archive
from streamer.sim.generate import generate_night


@pytest.fixture(scope="module")
def night(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    tmp = tmp_path_factory.mktemp("report")
    archive = tmp / "archive"
    generate_night(archive, NIGHT, ccds=(13,), n_exposures=3, flats_per_led=2, n_biases=8, seed=11, shape="small", jobs=1)
    reports = tmp / "reports"
    extra = f'[report]\nafter_night = true\ndirectory = "{reports}"\n\n[[consumers]]\nname = "qa"\nkeep = ["masters"]\n'
    with serve_archive(archive) as url:
        config = config_for(tmp, archive, url, budget=10**10, extra=extra)
        result = run_cli(config, *backfill_args())
    assert result.returncode == 0, result.stdout + result.stderr
    return {"config": config, "archive": archive, "reports": reports, "tmp": tmp}


def _ledger(config: Path, sql: str) -> list[tuple[Any, ...]]:
    with contextlib.closing(sqlite3.connect(f"file:{store_of(config) / 'ledger.sqlite'}?mode=ro", uri=True)) as db:
        return db.execute(sql).fetchall()


def _report_json(night: dict[str, Any]) -> dict[str, Any]:
    out = night["tmp"] / "by-hand"
    result = run_cli(night["config"], "report", "--night", NIGHT.isoformat(), "--out", str(out), "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == json.loads((out / "report.json").read_text())
    return json.loads(result.stdout)  # type: ignore[no-any-return]


def test_the_daemon_writes_the_page_once_the_night_has_ended(night: dict[str, Any]) -> None:
    page = night["reports"] / NIGHT.isoformat() / "index.html"
    assert page.is_file()
    text = page.read_text()
    images = re.findall(r"<img src='([^']+)'", text)
    assert images and all((page.parent / name).stat().st_size > 1000 for name in images)
    assert any(name.startswith("master_") for name in images) and "zeropoints_zr.png" in images
    assert "disk.png" in images and "throughput.png" in images


def test_zero_points_recover_the_simulated_magzp_and_the_map_is_flat(night: dict[str, Any]) -> None:
    report = _report_json(night)
    truth = json.loads((night["archive"] / "truth" / "params.json").read_text())
    magzp = {e["expid"]: e["magzp"] for e in truth["nights"][NIGHT.isoformat()]["exposures"] if e["imgtype"] == "object"}
    zr = [zp for zp in report["zero_points"] if zp["filtercode"] == "zr"]
    assert zr, "no zr zero-point: the test shows nothing"
    for zp in zr:
        # zr flux is 10**(-0.4 (G - MAGZP)) in the simulator; r = 3 px holds all but 0.3 % of it in its seeing
        assert zp["radius"] == 3.0 and zp["zp"] == pytest.approx(magzp[zp["expid"]], abs=0.01), zp
        assert zp["stars"] >= 5 and zp["scatter"] < 0.05
    for expid in {zp["expid"] for zp in zr}:
        values = [zp["zp"] for zp in zr if zp["expid"] == expid]
        assert len(values) == 4 and max(values) - min(values) < 0.01  # no injected per-quadrant response yet


def test_flag_counts_equal_those_of_the_catalogues(night: dict[str, Any]) -> None:
    report = _report_json(night)
    measurements = flagged = masked = 0
    for path in sorted((store_of(night["config"]) / "apcat").rglob("*.parquet")):
        table = pq.read_table(path)
        for name in table.column_names:
            if re.fullmatch(r"f_\d+_f", name):
                flags = table.column(name).to_numpy()
                measurements += flags.size
                flagged += int(np.count_nonzero(flags))
                masked += int(np.count_nonzero(flags & (1 << 8)))
    assert measurements > 0
    assert report["flags"]["measurements"] == measurements
    assert report["flags"]["flagged"] == flagged and report["flags"]["masked"] == masked


def test_master_statistics_match_the_simulated_bias(night: dict[str, Any]) -> None:
    report = _report_json(night)
    masters = _ledger(night["config"], "SELECT f.relpath FROM products p JOIN files f ON f.id = p.file_id "
                                       f"WHERE f.kind = 'masters' AND p.night = '{NIGHT.isoformat()}'")  # fmt: skip
    assert sorted(m["relpath"] for m in report["masters"]) == sorted(r[0] for r in masters)
    bias = next(m for m in report["masters"] if m["kind"] == "master_bias")
    with fits.open(night["archive"] / "truth" / "bias_c13.fits") as truth:
        for stats in bias["quadrants"]:
            expected = float(np.median(truth[stats["qid"]].data))
            assert stats["median"] == pytest.approx(expected, abs=0.5)  # ADU, the bias level after overscan
    flat = next(m for m in report["masters"] if m["kind"] == "master_flat")
    assert all(0.9 < q["median"] < 1.1 for q in flat["quadrants"])
    assert all(not m["quadrants"] for m in report["masters"] if m["kind"] == "led_flat")  # listed, not drawn


def test_disk_and_throughput_agree_with_the_ledger(night: dict[str, Any]) -> None:
    report = _report_json(night)
    samples = report["disk"]["samples"]
    assert samples and report["disk"]["peak"] <= report["disk"]["budget"]
    assert report["disk"]["peak"] == max(s["disk_bytes"] + s["reserved_bytes"] for s in samples)
    done = _ledger(night["config"], f"SELECT COUNT(*) FROM jobs WHERE night = '{NIGHT.isoformat()}' AND state = 'done'")
    assert sum(report["throughput"]["jobs_done"]["counts"]) == done[0][0] > 0
    fetched = _ledger(night["config"], f"SELECT COUNT(*) FROM files WHERE night = '{NIGHT.isoformat()}' "
                                       "AND url != '' AND fetched_at IS NOT NULL")  # fmt: skip
    assert sum(report["throughput"]["downloads"]["counts"]) == fetched[0][0] > 0
    assert all(not rows for rows in report["problems"].values()), report["problems"]


def test_a_bad_night_is_a_usage_error(night: dict[str, Any]) -> None:
    result = run_cli(night["config"], "report", "--night", "2020-13-01")
    assert result.returncode == 2 and "expected a date" in result.stderr and "Traceback" not in result.stderr
    result = run_cli(night["config"], "report", "--night", "2020-09-23", "--out", str(night["tmp"] / "none"))
    assert result.returncode == 1 and result.stderr.count("\n") == 1 and "no jobs" in result.stderr


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ({"after_night": True}, "report.directory = (missing)"),
        ({"directory": "{root}/reports"}, "a directory outside storage.root"),
    ],
)
def test_a_report_directory_that_the_budget_cannot_count_is_refused(
    tmp_path: Path, table: dict[str, Any], message: str
) -> None:
    from streamer.config import config_from_dict
    from streamer.errors import ConfigError

    root = tmp_path / "store"
    raw = {"storage": {"root": str(root), "budget": "1 GB"}, "photometry": {"catalog_dir": str(tmp_path)},
           "report": {k: v.format(root=root) if isinstance(v, str) else v for k, v in table.items()}}  # fmt: skip
    with pytest.raises(ConfigError, match="report.directory") as caught:
        config_from_dict(raw)
    assert "\n" not in str(caught.value)
    if "missing" not in message:
        assert message in str(caught.value)
