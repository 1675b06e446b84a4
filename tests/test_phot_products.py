"""The apcat and detrended-image formats: columns, metadata, atomic writes, fixed quantisation."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest
from astropy.io import fits

from streamer.formats import apcat as products
from streamer.photometry import Apertures
from streamer.storage import paths
from streamer.storage.naming import RawName

RAW = RawName("20200924431759", 655, "zr", 13, "o")
EXPOSURE = products.ExposureInfo("20200924431759", 136243177, 655, "zr", 13, 2459116.9317708)
RADII = (3.0, 5.0, 8.0)


def quadrant_rows(qid: int, n: int, seed: int) -> products.QuadrantRows:
    rng = np.random.default_rng(seed)
    ids = rng.permutation(n).astype(np.int64) + 1000 * qid
    k = len(RADII)
    return products.QuadrantRows(
        qid=qid,
        source_id=ids,
        ra=rng.uniform(57, 58, n),
        dec=rng.uniform(35, 36, n),
        mags={m: rng.uniform(12, 20, n).astype(np.float32) for m in ("phot_g_mean_mag", "phot_bp_mean_mag", "phot_rp_mean_mag")},
        x=rng.uniform(0, 3071, n),
        y=rng.uniform(0, 3079, n),
        isolated=rng.random(n) > 0.3,
        apertures=Apertures(
            flux=rng.normal(1e4, 10, (n, k)),
            flux_err=rng.uniform(1, 2, (n, k)),
            flags=rng.integers(0, 2, (n, k)).astype(np.int32) << 8,
            mask_bits=rng.integers(0, 4, n).astype(np.int32) << 8,
        ),
        ipac_mask=qid != 2,
        wcs_from_qid=qid if qid != 4 else 3,
    )


def test_apcat_relpath_layout() -> None:
    assert paths.apcat_relpath(RAW) == "apcat/2020/0924/ztf_20200924431759_000655_zr_c13_o_apcat.parquet"
    assert paths.detrended_relpath(RAW, 3) == "detrended/2020/0924/ztf_20200924431759_000655_zr_c13_o_q3_detrended.fits.fz"


def test_apcat_columns_order_and_metadata(tmp_path: Path) -> None:
    quads = [quadrant_rows(3, 40, 1), quadrant_rows(1, 25, 2), quadrant_rows(4, 0, 3)]
    table = products.apcat_table(EXPOSURE, quads, RADII)
    path = products.write_apcat(tmp_path / paths.apcat_relpath(RAW), table, RADII, {"config_hash": "abc", "masters": {"bias": "20200924"}})
    back = pq.read_table(path)
    expected_columns = list(products.APCAT_BASE_COLUMNS)
    for k in range(len(RADII)):
        expected_columns += [f"f_{k}", f"f_{k}_e", f"f_{k}_f", f"r_{k}"]
    expected_columns += list(products.EXPOSURE_COLUMNS) + list(products.MASK_COLUMNS) + ["focalplane_factor"]
    assert back.column_names == expected_columns
    assert back.num_rows == 65
    data = back.to_pydict()
    assert data["qid"] == [1] * 25 + [3] * 40
    assert data["source_id"][:25] == sorted(data["source_id"][:25])
    assert set(data["rcid"]) == {48, 50}
    assert set(data["r_2"]) == {8.0}
    assert set(data["filefracday"]) == {20200924431759} and set(data["filtercode"]) == {"zr"}
    row = data["source_id"].index(int(quads[1].source_id[0]))
    assert data["f_1"][row] == quads[1].apertures.flux[0, 1]
    assert data["f_1_f"][row] == quads[1].apertures.flags[0, 1]
    assert data["x"][row] == quads[1].x[0] and data["isolated"][row] == bool(quads[1].isolated[0])
    assert data["focalplane_factor"] == [None] * 65  # no factor made: null, not NaN (rows stay comparable)
    with_factor = products.apcat_table(dataclasses.replace(EXPOSURE, focalplane_factor=0.97), quads, RADII)
    assert set(with_factor["focalplane_factor"].to_pylist()) == {0.97}
    meta = back.schema.metadata
    assert json.loads(meta[b"radii"]) == list(RADII)
    record = json.loads(meta[b"streamer"])
    assert record["config_hash"] == "abc" and record["masters"] == {"bias": "20200924"}
    assert "sep" in record["packages"]
    assert [p.name for p in path.parent.iterdir()] == [path.name]


def test_two_writes_of_the_same_data_give_identical_rows(tmp_path: Path) -> None:
    first = products.write_apcat(tmp_path / "a.parquet", products.apcat_table(EXPOSURE, [quadrant_rows(2, 30, 7)], RADII), RADII, {"run": 1})
    second = products.write_apcat(tmp_path / "b.parquet", products.apcat_table(EXPOSURE, [quadrant_rows(2, 30, 7)], RADII), RADII, {"run": 2})
    assert pq.read_table(first).equals(pq.read_table(second))


def test_only_the_repeating_columns_get_dictionary_pages(tmp_path: Path) -> None:
    path = products.write_apcat(tmp_path / "a.parquet", products.apcat_table(EXPOSURE, [quadrant_rows(2, 300, 7)], RADII), RADII, {})
    row_group = pq.ParquetFile(path).metadata.row_group(0)
    encodings = {row_group.column(i).path_in_schema: row_group.column(i).encodings for i in range(row_group.num_columns)}
    with_dictionary = {name for name, used in encodings.items() if "RLE_DICTIONARY" in used or "PLAIN_DICTIONARY" in used}
    assert {"qid", "ccdid", "f_0_f", "filtercode"} <= with_dictionary  # (Parquet bit-packs booleans: no dictionary)
    assert not with_dictionary & {"source_id", "ra", "dec", "x", "y", "f_0", "f_0_e"}


def test_empty_apcat_has_the_full_schema(tmp_path: Path) -> None:
    table = products.apcat_table(EXPOSURE, [], RADII)
    assert table.num_rows == 0 and table.schema.equals(products.apcat_schema(len(RADII)))


def test_failed_write_leaves_neither_product_nor_temporary(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[str] = []

    def failing_write(table: Any, handle: Any, **kwargs: Any) -> None:
        seen.append(Path(handle.name).name)
        handle.write(b"PAR1 partial")
        raise OSError("disk full")

    monkeypatch.setattr(products.pq, "write_table", failing_write)
    target = tmp_path / "apcat" / "x.parquet"
    with pytest.raises(OSError, match="disk full"):
        products.write_apcat(target, products.apcat_table(EXPOSURE, [quadrant_rows(1, 5, 1)], RADII), RADII, {})
    assert seen and not seen[0].endswith(".parquet")
    assert list(target.parent.iterdir()) == []


def test_detrended_image_uses_the_fixed_quantisation_step(tmp_path: Path) -> None:
    rng = np.random.default_rng(4)
    image = rng.normal(200.0, 8.0, (200, 240)).astype(np.float32)
    variance = np.full_like(image, 40.0) + rng.normal(0, 1, image.shape).astype(np.float32)
    mask = rng.integers(0, 2**12, image.shape).astype(np.int32)
    step = 0.25
    header = fits.Header({"CCDID": 13, "QID": 3})
    path = products.write_detrended(tmp_path / "q3.fits.fz", image, variance, mask, header, step)
    with fits.open(path) as hdus:
        sci = hdus["SCI"].data
        var = hdus["VAR"].data
        np.testing.assert_array_equal(hdus["MASK"].data, mask)
        assert hdus[0].header["QID"] == 3
    residual = sci - image
    assert np.abs(residual).max() <= step / 2 + 1e-4
    assert 0.8 < residual.std() / (step / np.sqrt(12)) < 1.2  # a 0.25 ADU step, not the default noise/16 (0.5 ADU here)
    assert np.abs(var - variance).max() <= step / 2 + 1e-4
