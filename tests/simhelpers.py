"""Helpers for tests that need a simulated night: generation with small defaults, and a tiny detrender.

The detrender here is the obvious slow reference (overscan median per row, ``correct()``, truth bias,
truth flat); it checks the generator's truth conventions, not the service's pipeline.
"""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from astropy.io import fits

from streamer.detrend.nonlinearity import correct
from streamer.detrend.readout import to_readout
from streamer.sim.generate import NightTruth, generate_night

NIGHT = dt.date(2020, 9, 24)


def small_night(out: Path, **overrides: Any) -> NightTruth:
    """A small-shape night of CCD 13: 6 biases, 2 flats per LED of zr, 3 science exposures (seed 7)."""
    night = overrides.pop("night", NIGHT)
    arguments: dict[str, Any] = dict(
        ccds=(13,), n_exposures=3, flats_per_led=2, n_biases=6, seed=7, shape="small", flat_filters=("zr",)
    )
    arguments.update(overrides)
    return generate_night(out, night, **arguments)


def params(out: Path) -> dict[str, Any]:
    result: dict[str, Any] = json.loads((out / "truth" / "params.json").read_text())
    return result


def overscan_subtracted(raw_path: Path, qid: int, window: tuple[int, int] = (20, 30)) -> npt.NDArray[np.float64]:
    """Data of quadrant ``qid`` minus the per-row median of the overscan columns ``window`` (readout order)."""
    with fits.open(raw_path) as hdus:
        data = hdus[qid].data.astype(np.float64)
        overscan = hdus[qid + 4].data.astype(np.float64)
    level = np.median(to_readout(overscan, qid)[:, window[0]:window[1]], axis=1)
    if qid in (3, 4):
        level = level[::-1]
    return data - level[:, None]


def detrended(out: Path, raw_relpath: str, qid: int, night: str = NIGHT.isoformat()) -> npt.NDArray[np.float64]:
    """A science quadrant detrended with the truth: overscan, ``correct()``, truth bias, truth flat."""
    truth = params(out)
    name = Path(raw_relpath).name
    ccdid = int(name.split("_c")[1][:2])
    filtercode = name.split("_")[3]
    a, b = truth["nights"][night]["nonlinearity"][str(ccdid)][str(qid)]
    linear = correct(overscan_subtracted(out / raw_relpath, qid), a, b).astype(np.float64)
    bias = fits.getdata(out / "truth" / f"bias_c{ccdid:02d}.fits", qid).astype(np.float64)
    flat = fits.getdata(out / "truth" / f"flat_{filtercode}_c{ccdid:02d}.fits", qid).astype(np.float64)
    result: npt.NDArray[np.float64] = (linear - bias) / flat
    return result
