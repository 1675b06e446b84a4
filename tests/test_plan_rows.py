"""Planning from search rows (pure), recording idempotently, CSV strictness and retention."""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest

from streamer.archive.search import SCI_COLUMNS, SearchError, night_jd_range, parse_search_csv, split_range
from streamer.config import ConsumerConfig, Target
from streamer.ledger.core import Ledger
from streamer.rules.retention import FileFacts, Footprint, consumer_keeps
from streamer.service.plan import plan_from_rows, record_plan, used_biases

NIGHT = dt.date(2020, 9, 24)
BASE = "http://127.0.0.1:1"
PIX = 1.0 / 3600


def _raw(ffd: str, imgtype: str, ccdid: int = 13, obsjd: float = 2459117.0, field: int = 655) -> dict[str, Any]:
    code = imgtype[0]
    filt = "bi" if imgtype == "bias" else "zr"
    return {"field": field if imgtype == "object" else 0, "ccdid": ccdid, "filtercode": filt, "expid": 1,
            "imgtype": imgtype, "imgtypecode": code, "filefracday": ffd, "obsjd": obsjd, "exptime": 30.0}  # fmt: skip


def _sci(ffd: str, qid: int, ccdid: int = 13, ra: float = 10.0, dec: float = 20.0) -> dict[str, Any]:
    return {"field": 655, "ccdid": ccdid, "qid": qid, "filtercode": "zr", "expid": 1, "imgtypecode": "o",
            "filefracday": ffd, "obsjd": 2459117.4, "exptime": 30.0, "crpix1": 1536.5, "crpix2": 1540.5,
            "crval1": ra, "crval2": dec, "cd11": -PIX, "cd12": 0.0, "cd21": 0.0, "cd22": PIX}  # fmt: skip


def _rows() -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    biases = [_raw(f"2020092410{i:04d}", "bias", obsjd=2459116.6 + i * 1e-3) for i in range(4)]
    flats = [_raw("20200924200000", "flat"), _raw("20200924200100", "flat")]
    science = [_raw("20200924431759", "object", obsjd=2459117.4)]
    return biases + flats + science, [_sci("20200924431759", q) for q in range(1, 5)]


def test_plan_skips_biases_and_plans_headers_and_masks() -> None:
    raw, sci = _rows()
    plan = plan_from_rows(NIGHT, [13], raw, sci, [], base_url=BASE, bias_skip_first=2, leds={"20200924200000": 7})
    kinds = sorted(f.kind for f in plan.files)
    assert kinds.count("raw") == 2 + 2 + 1  # 4 biases minus the first 2, 2 flats, 1 science
    assert kinds.count("sciimg_header") == 4 and kinds.count("mskimg") == 4 and "sciimg" not in kinds
    relpaths = {f.relpath for f in plan.files}
    assert "raw/2020/0924/100000/ztf_20200924100000_000000_bi_c13_b.fits.fz" not in relpaths
    assert any(p.endswith("_q3_sciimg.header.fits") for p in relpaths)
    assert any(p.endswith("_q3_mskimg.fits.fz") for p in relpaths)
    mask = next(f for f in plan.files if f.kind == "mskimg")
    assert mask.url.endswith("_mskimg.fits") and not any(f.kept for f in plan.files)
    assert plan.flats_without_led == ("20200924200100",)
    led = {e.filefracday: e.led for e in plan.exposures if e.imgtype == "flat"}
    assert led == {"20200924200000": 7, "20200924200100": None}


def test_used_biases_orders_by_obsjd() -> None:
    rows = [_raw("20200924100003", "bias", obsjd=3.0), _raw("20200924100001", "bias", obsjd=1.0),
            _raw("20200924100002", "bias", obsjd=2.0)]  # fmt: skip
    assert used_biases(rows, 1) == {("20200924100002", 13), ("20200924100003", 13)}


def test_consumer_keeping_raws_keeps_skipped_biases_and_targets_select_quadrants() -> None:
    raw, sci = _rows()
    keep_raw = ConsumerConfig(name="raws", keep=("raw",))
    plan = plan_from_rows(NIGHT, [13], raw, sci, [keep_raw], base_url=BASE, bias_skip_first=2)
    assert sum(f.kind == "raw" for f in plan.files) == 7 and all(f.kept for f in plan.files if f.kind == "raw")
    # A target near the centre of quadrant 2's footprint only.
    sci[1] = _sci("20200924431759", 2, ra=40.0, dec=-5.0)
    scene = ConsumerConfig(name="scene", keep=("sciimg", "mskimg"), targets=(Target(40.0, -5.0, 0.01),))
    plan = plan_from_rows(NIGHT, [13], raw, sci, [scene], base_url=BASE, bias_skip_first=2)
    full = [f for f in plan.files if f.kind == "sciimg"]
    assert [f.qid for f in full] == [2] and full[0].kept
    assert [f.qid for f in plan.files if f.kind == "mskimg" and f.kept] == [2]
    # Only images kept, no catalogues: raws are not needed at all.
    assert not any(f.kind == "raw" for f in plan.files)


def test_record_plan_is_idempotent_and_keeps_on_disk_files() -> None:
    raw, sci = _rows()
    plan = plan_from_rows(NIGHT, [13], raw, sci, [], base_url=BASE, bias_skip_first=2, leds={"20200924200000": 7})
    ledger = Ledger.memory()
    first = record_plan(ledger, plan)
    on_disk = first.to_download[0]
    with ledger.transaction() as conn:
        ledger.set_file_state(conn, on_disk, "on_disk", disk_bytes=4096)
    dump = [ledger.rows("SELECT * FROM exposures ORDER BY id"), ledger.rows("SELECT * FROM files ORDER BY id")]
    again = record_plan(ledger, plan)
    assert [ledger.rows("SELECT * FROM exposures ORDER BY id"), ledger.rows("SELECT * FROM files ORDER BY id")] == dump
    assert on_disk not in again.to_download and again.on_disk == 1
    assert len(again.to_download) == len(first.to_download) - 1


def test_csv_is_parsed_strictly() -> None:
    header = ",".join(SCI_COLUMNS)
    good = header + "\n655,13,3,zr,1,o,20200924431759,2459117.4,30,1,2,3,4,5,6,7,8\n"
    rows = parse_search_csv(good, SCI_COLUMNS)
    assert rows[0]["qid"] == 3 and rows[0]["obsjd"] == 2459117.4
    assert parse_search_csv(header + "\n", SCI_COLUMNS) == []
    bad = {
        "xml": '<?xml version="1.0"?><VOTABLE><INFO name="QUERY_STATUS" value="ERROR">bad WHERE</INFO></VOTABLE>',
        "empty": "",
        "short row": header + "\n655,13,3\n",
        "bad number": good.replace("2459117.4", "tomorrow"),
        "missing column": "field,ccdid\n1,2\n",
        "bad filefracday": good.replace("20200924431759", "2020"),
    }
    for what, text in bad.items():
        with pytest.raises(SearchError):
            parse_search_csv(text, SCI_COLUMNS)
        assert what


def test_night_ranges_are_bounded() -> None:
    start, end = night_jd_range(NIGHT)
    assert start == pytest.approx(2459116.5) and end == pytest.approx(2459117.5)
    pieces = split_range(start, end, 0.25)
    assert len(pieces) == 4 and pieces[0][0] == start and pieces[-1][1] == end


def test_retention_by_field_date_and_footprint() -> None:
    fp = Footprint(10.0, 20.0, 1536.5, 1540.5, -PIX, 0.0, 0.0, PIX)
    facts = FileFacts("sciimg", 655, NIGHT, (fp,))
    assert consumer_keeps(ConsumerConfig(name="a", keep=("sciimg",)), facts)
    assert not consumer_keeps(ConsumerConfig(name="a", keep=("raw",)), facts)
    assert not consumer_keeps(ConsumerConfig(name="a", keep=("sciimg",), fields=(1,)), facts)
    assert not consumer_keeps(ConsumerConfig(name="a", keep=("sciimg",), start=dt.date(2021, 1, 1)), facts)
    # Quadrant half-width ~0.43 deg in ra: a target 0.5 deg away with radius 0.1 touches it; radius 0.01 does not.
    near = ConsumerConfig(name="a", keep=("sciimg",), targets=(Target(10.0 + 0.5 / 0.9397, 20.0, 0.1),))
    far = ConsumerConfig(name="a", keep=("sciimg",), targets=(Target(10.0 + 0.5 / 0.9397, 20.0, 0.01),))
    late = ConsumerConfig(name="a", keep=("sciimg",), targets=(Target(10.0, 20.0, 0.1, start=dt.date(2021, 1, 1)),))
    assert consumer_keeps(near, facts) and not consumer_keeps(far, facts) and not consumer_keeps(late, facts)


def test_keeping_detrended_images_alone_still_plans_what_the_exposure_jobs_need() -> None:
    raw, sci = _rows()
    images = ConsumerConfig(name="images", keep=("detrended",))
    plan = plan_from_rows(NIGHT, [13], raw, sci, [images], base_url=BASE, bias_skip_first=2, write_detrended=True)
    kinds = [f.kind for f in plan.files]
    assert kinds.count("sciimg_header") == 4 and kinds.count("mskimg") == 4  # the WCS comes from the headers
    assert kinds.count("detrended") == 4 and all(f.kept and f.url == "" for f in plan.files if f.kind == "detrended")
    assert not any(f.kept for f in plan.files if f.kind != "detrended")


def test_planning_again_replaces_who_keeps_what() -> None:
    """A consumer whose selection changed: the files a new plan still lists get its keepers, those it
    no longer lists (a full sciimg nobody keeps now) lose theirs; a file of another CCD is untouched."""
    raw, sci = _rows()
    ledger = Ledger.memory()
    scene = ConsumerConfig(name="scene", keep=("sciimg", "mskimg"))
    raws = ConsumerConfig(name="raws", keep=("raw",), fields=(655,))
    record_plan(ledger, plan_from_rows(NIGHT, [13], raw, sci, [], base_url=BASE, bias_skip_first=2))
    other = [_raw("20200924431759", "object", ccdid=14)]
    record_plan(ledger, plan_from_rows(NIGHT, [14], other, [], [scene, raws], base_url=BASE, bias_skip_first=2))
    record_plan(ledger, plan_from_rows(NIGHT, [13], raw, sci, [scene, raws], base_url=BASE, bias_skip_first=2))

    def keepers(kind: str, ccd: int = 13) -> dict[str, list[str]]:
        rows = ledger.rows(
            "SELECT f.id, f.relpath, f.kept FROM files f JOIN exposures e ON e.id = f.exposure_id "
            "WHERE f.kind = ? AND e.ccdid = ?", (kind, ccd),
        )  # fmt: skip
        assert all(r["kept"] == bool(ledger.keepers(r["id"])) for r in rows)
        return {r["relpath"]: ledger.keepers(r["id"]) for r in rows}

    assert len(keepers("sciimg")) == 4 and all(k == ["scene"] for k in keepers("sciimg").values())
    assert all(k == ["scene"] for k in keepers("mskimg").values())
    science = [p for p, k in keepers("raw").items() if "_o." in p]
    assert len(science) == 1 and keepers("raw")[science[0]] == ["raws"]
    assert all(k == [] for p, k in keepers("raw").items() if "_o." not in p)  # calibration raws: field 0
    # scene now keeps masks only: the full images are no longer planned, and no longer kept
    scene_masks = ConsumerConfig(name="scene", keep=("mskimg",))
    record_plan(ledger, plan_from_rows(NIGHT, [13], raw, sci, [scene_masks, raws], base_url=BASE, bias_skip_first=2))
    assert len(keepers("sciimg")) == 4 and all(k == [] for k in keepers("sciimg").values())
    assert all(k == ["scene"] for k in keepers("mskimg").values())
    assert list(keepers("raw", 14).values()) == [["raws"]]  # another CCD's plan is not this one's to undo
