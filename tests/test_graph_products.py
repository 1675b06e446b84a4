"""The work graph: which biases the master bias pins, and detrended images as products with a producer."""

from __future__ import annotations

import datetime as dt
from dataclasses import replace
from pathlib import Path
from typing import Any

from streamer.config import ConsumerConfig, load_config
from streamer.execution.jobs import build_call
from streamer.ledger.core import Ledger
from streamer.rules.retention import FileFacts, is_kept
from streamer.service.graph import build_night_graph
from streamer.service.plan import plan_from_rows, record_plan

NIGHT = dt.date(2020, 9, 24)
BASE = "http://127.0.0.1:1"
PIX = 1.0 / 3600
SCIENCE = "20200924431759"


def _raw(ffd: str, imgtype: str, obsjd: float) -> dict[str, Any]:
    return {"field": 655 if imgtype == "object" else 0, "ccdid": 13, "filtercode": "bi" if imgtype == "bias" else "zr",
            "expid": 1, "imgtype": imgtype, "imgtypecode": imgtype[0], "filefracday": ffd, "obsjd": obsjd,
            "exptime": 30.0}  # fmt: skip


def _sci(qid: int) -> dict[str, Any]:
    return {"field": 655, "ccdid": 13, "qid": qid, "filtercode": "zr", "expid": 1, "imgtypecode": "o",
            "filefracday": SCIENCE, "obsjd": 2459117.4, "exptime": 30.0, "crpix1": 1536.5, "crpix2": 1540.5,
            "crval1": 10.0, "crval2": 20.0, "cd11": -PIX, "cd12": 0.0, "cd21": 0.0, "cd22": PIX}  # fmt: skip


def _night(ledger: Ledger, consumers: list[ConsumerConfig], *, write_detrended: bool, skip: int = 2) -> dict[str, int]:
    # bias file names run against their obsjd: the skip must follow obsjd
    biases = [_raw(f"2020092410{9 - i:04d}", "bias", 2459116.6 + i * 1e-3) for i in range(5)]
    flats = [_raw("20200924200000", "flat", 2459116.7)]
    raw = [*biases, *flats, _raw(SCIENCE, "object", 2459117.4)]
    plan = plan_from_rows(
        NIGHT, [13], raw, [_sci(q) for q in (1, 2, 3, 4)], consumers, base_url=BASE, bias_skip_first=skip,
        leds={"20200924200000": 7}, write_detrended=write_detrended,
    )  # fmt: skip
    record_plan(ledger, plan)
    return build_night_graph(ledger, NIGHT.isoformat(), [13], bias_skip_first=skip, focalplane=False)


def _job(ledger: Ledger, kind: str) -> dict[str, Any]:
    return ledger.rows("SELECT * FROM jobs WHERE kind = ?", (kind,))[0]


def test_master_bias_pins_the_biases_after_the_skip_in_time_order() -> None:
    ledger = Ledger.memory()
    _night(ledger, [], write_detrended=False)
    job = _job(ledger, "master_bias")
    pinned = ledger.rows(
        "SELECT e.filefracday FROM pins p JOIN files f ON f.id = p.file_id JOIN exposures e ON e.id = f.exposure_id "
        "WHERE p.job_id = ? ORDER BY e.filefracday",
        (job["id"],),
    )
    # obsjd order is 0009, 0008, 0007, 0006, 0005: the first two (0009, 0008) are left out
    assert [r["filefracday"] for r in pinned] == ["20200924100005", "20200924100006", "20200924100007"]


def test_without_the_option_there_are_no_detrended_rows() -> None:
    ledger = Ledger.memory()
    _night(ledger, [], write_detrended=False)
    assert ledger.rows("SELECT * FROM files WHERE kind = 'detrended'") == []


def test_detrended_images_are_outputs_of_their_exposure_job(tmp_path: Path, minimal_config_text: str) -> None:
    keeper = ConsumerConfig(name="images", keep=("detrended",), fields=(655,))
    ledger = Ledger.memory()
    _night(ledger, [keeper], write_detrended=True)
    exposure = _job(ledger, "exposure")
    rows = ledger.rows("SELECT * FROM files WHERE kind = 'detrended' ORDER BY qid")
    assert [r["qid"] for r in rows] == [1, 2, 3, 4]
    assert {r["producer_job"] for r in rows} == {exposure["id"]}
    assert all(r["url"] == "" and r["state"] == "wanted" and r["kept"] == 1 for r in rows)
    assert rows[2]["relpath"] == f"detrended/2020/0924/ztf_{SCIENCE}_000655_zr_c13_o_q3_detrended.fits.fz"
    assert is_kept([keeper], FileFacts("detrended", 655, NIGHT, ())) and not is_kept(
        [replace(keeper, fields=(700,))], FileFacts("detrended", 655, NIGHT, ())
    )
    path = tmp_path / "c.toml"
    path.write_text(minimal_config_text)
    with ledger.transaction() as conn:
        for pin in ledger.rows("SELECT file_id FROM pins WHERE job_id = ?", (exposure["id"],)):
            ledger.set_file_state(conn, pin["file_id"], "on_disk", disk_bytes=4096)
    call = build_call(ledger, load_config(path), exposure)
    assert set(call.outputs) == {r["relpath"] for r in rows} | {
        f"apcat/2020/0924/ztf_{SCIENCE}_000655_zr_c13_o_apcat.parquet"
    }


def test_detrended_rows_not_kept_without_a_consumer_keeping_them() -> None:
    ledger = Ledger.memory()
    _night(ledger, [ConsumerConfig(name="cats", keep=("apcat",))], write_detrended=True)
    rows = ledger.rows("SELECT kept, producer_job FROM files WHERE kind = 'detrended'")
    assert len(rows) == 4 and all(r["kept"] == 0 and r["producer_job"] is not None for r in rows)
