"""``streamer explain``: after a real backfill (catalogue, master, deleted raw), and on a ledger built by hand
(a pinned raw, an erasable raw, a raw a consumer keeps)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from e2e import NIGHT, backfill_args, config_for, run_cli, store_of
from streamer.cli import main
from streamer.demo import DEMO_BIAS_SKIP, serve_archive
from streamer.ledger import downloads
from streamer.ledger.core import Ledger
from streamer.sim.generate import generate_night

UNLIMITED = 50 * 10**9


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("archive")
    generate_night(out, NIGHT, ccds=(13,), n_exposures=2, flats_per_led=2, n_biases=8, seed=7, shape="small", jobs=2)
    return out


@pytest.fixture(scope="module")
def backfilled(tmp_path_factory: pytest.TempPathFactory, archive: Path) -> Iterator[Path]:
    tmp = tmp_path_factory.mktemp("backfilled")
    with serve_archive(archive) as base_url:
        config = config_for(tmp, archive, base_url, budget=UNLIMITED)
        result = run_cli(config, *backfill_args(ccds=(13,)))
    assert result.returncode == 0, result.stdout + result.stderr
    yield config


def _explain(config: Path, name: str) -> dict[str, Any]:
    result = run_cli(config, "explain", name, "--json", timeout=60)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)  # type: ignore[no-any-return]


def test_a_catalogue_is_kept_never_erased_and_names_its_inputs(backfilled: Path, archive: Path) -> None:
    science = sorted((archive / "raw").rglob("*_o.fits.fz"))[0]
    apcat_name = science.name.replace(".fits.fz", "_apcat.parquet")
    report = _explain(backfilled, apcat_name)
    assert report["file"]["kind"] == "apcat" and report["file"]["state"] == "on_disk"
    assert [c["consumer"] for c in report["consumers"] if c["keeps"]] == ["ubercal"]
    assert report["erasable"]["now"] is False
    # what the evictor checks: a catalogue is never erased, and ubercal's keep is recorded on it
    assert report["erasable"]["blockers"] == ["it is a catalogue (never erased)", "kept by ubercal"]
    assert report["file"]["kept_by"] == ["ubercal"]
    assert report["pinned_by"] == []
    producer = report["producer"]
    assert producer["kind"] == "exposure" and producer["state"] == "done"
    inputs = {i["relpath"] for i in producer["inputs"]}
    assert science.relative_to(archive).as_posix() in inputs  # the archive's raw/... layout is the store's
    assert "masters/2020/0924/ccd13/ztf_20200924_c13_bias.fits" in inputs
    sources = {i["relpath"]: i["source"] for i in producer["inputs"]}
    assert sources["masters/2020/0924/ccd13/ztf_20200924_c13_bias.fits"] == "same night"
    assert sources[science.relative_to(archive).as_posix()] == "exposure"
    filtercode = science.name.split("_")[3]
    assert f"masters/2020/0924/ccd13/ztf_20200924_c13_{filtercode}_flat.fits" in inputs


def test_a_master_names_the_raws_it_was_made_of(backfilled: Path, archive: Path) -> None:
    report = _explain(backfilled, "masters/2020/0924/ccd13/ztf_20200924_c13_bias.fits")
    assert report["producer"]["kind"] == "master_bias"
    biases = sorted(p.relative_to(archive).as_posix() for p in (archive / "raw").rglob("*_b.fits.fz"))
    assert {i["relpath"] for i in report["producer"]["inputs"]} == set(biases[DEMO_BIAS_SKIP:])
    # nobody keeps masters: at the end of the backfill it went, so it is not erasable for that reason only
    assert report["file"]["state"] == "deleted"
    assert report["erasable"] == {"now": False, "blockers": ["it is not on disk (it is deleted)"]}


def test_a_deleted_raw_by_its_absolute_path(backfilled: Path, archive: Path) -> None:
    raw = sorted((archive / "raw").rglob("*_o.fits.fz"))[-1].relative_to(archive).as_posix()
    report = _explain(backfilled, str(store_of(backfilled) / raw))
    assert report["file"]["relpath"] == raw and report["file"]["state"] == "deleted"
    assert report["file"]["url"] and report["file"]["fetched_at"] is not None
    assert report["producer"] is None and report["pinned_by"] == []
    assert report["erasable"]["now"] is False and report["erasable"]["blockers"] == ["it is not on disk (it is deleted)"]
    text = run_cli(backfilled, "explain", raw, timeout=60)
    assert text.returncode == 0 and "erasable now: no: it is not on disk" in text.stdout and "downloaded from" in text.stdout


def test_unknown_names_are_one_line_exit_1(backfilled: Path) -> None:
    result = run_cli(backfilled, "explain", "ztf_no_such_file.fits.fz", timeout=60)
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.count("\n") == 1 and "no such file" in result.stderr
    outside = run_cli(backfilled, "explain", "/etc/passwd", timeout=60)
    assert outside.returncode == 1 and "not under the storage root" in outside.stderr
    assert run_cli(backfilled, "explain", timeout=60).returncode == 2


# --- a ledger built by hand -------------------------------------------------------------------

CONSUMERS = """
[[consumers]]
name = "ubercal"
keep = ["apcat"]

[[consumers]]
name = "rawfan"
keep = ["raw"]
fields = [655]
"""


def _hand_built(tmp_path: Path) -> Path:
    store = tmp_path / "store"
    store.mkdir()
    config = tmp_path / "config.toml"
    config.write_text(f'[storage]\nroot = "{store}"\nbudget = "1 GB"\n\n[photometry]\ncatalog_dir = "{tmp_path}"\n{CONSUMERS}')
    with Ledger.open(store / "ledger.sqlite") as ledger:
        with ledger.transaction() as conn:
            ids = {
                name: ledger.want_file(conn, relpath=f"raw/2020/0924/{name}.fits.fz", kind="raw", url=f"http://a/{name}",
                                       night="2020-09-24", field=field, expected_size=1000, kept=kept)
                for name, field, kept in (("pinned", 700, False), ("free", 700, False), ("kept", 655, True))
            }  # fmt: skip
            ledger.add_job(conn, kind="exposure", key="exposure:pinned", pins=[ids["pinned"]])
        for file_id in ids.values():
            assert ledger.reserve(file_id, 1000, budget=10**9)
            downloads.mark_downloading(ledger, file_id)
            downloads.mark_on_disk(ledger, file_id, disk_bytes=4096, actual_size=1000, http_status=200)
    return config


def _explain_in_process(config: Path, name: str, capsys: pytest.CaptureFixture[str]) -> dict[str, Any]:
    assert main(["--config", str(config), "explain", name, "--json"]) == 0
    return json.loads(capsys.readouterr().out)  # type: ignore[no-any-return]


def test_a_pinned_raw_waits_for_its_task(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    report = _explain_in_process(_hand_built(tmp_path), "pinned.fits.fz", capsys)
    assert [(p["key"], p["state"]) for p in report["pinned_by"]] == [("exposure:pinned", "waiting")]
    assert report["erasable"] == {"now": False, "blockers": ["pinned until these tasks finish: exposure:pinned (waiting)"]}
    assert not any(c["keeps"] for c in report["consumers"])


def test_an_unpinned_unkept_raw_is_erasable(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    report = _explain_in_process(_hand_built(tmp_path), "free.fits.fz", capsys)
    assert report["erasable"] == {"now": True, "blockers": []}
    verdicts = {c["consumer"]: (c["keeps"], c["why"]) for c in report["consumers"]}
    assert verdicts == {"ubercal": (False, "kind not kept"), "rawfan": (False, "field or dates outside its selection")}


def test_a_kept_raw_names_its_consumer_and_rule(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    report = _explain_in_process(_hand_built(tmp_path), "raw/2020/0924/kept.fits.fz", capsys)
    rawfan = next(c for c in report["consumers"] if c["consumer"] == "rawfan")
    assert rawfan["keeps"] is True and rawfan["rule"]["fields"] == [655] and rawfan["rule"]["kind"] == ["raw"]
    assert report["erasable"] == {"now": False, "blockers": ["kept by rawfan"]}
    assert report["file"]["disk_bytes"] == 4096 and report["file"]["attempts"] == 1
