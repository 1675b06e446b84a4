"""Worker side of the focal-plane flat normalisation: master flat files in, a small JSON of factors out.

The factors come from :func:`streamer.work.masters.focalplane_factors`, fed with what each master
flat records in its primary header (``MEDIAN``, ``LEVnn``, ``WLEDnn``); the JSON holds
``{"night", "filtercode", "factors": {ccdid: factor}}`` and is written atomically.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from streamer.formats.masters import read_master_header
from streamer.storage.atomic import write_atomically
from streamer.work.masters import MasterResult, focalplane_factors


def _flat_record(path: str) -> MasterResult:
    header = read_master_header(path)
    levels = tuple(sorted((int(k[3:]), float(header[k])) for k in header if k.startswith("LEV") and k[3:].isdigit()))
    weights = tuple(sorted((int(k[4:]), float(header[k])) for k in header if k.startswith("WLED") and k[4:].isdigit()))
    return MasterResult(
        path=path, kind="flat", night=str(header["NIGHT"]), ccdid=int(header["CCD_ID"]),
        filtercode=str(header["FILTER"]), frames_used=(), frames_rejected=(), quadrants=(), failed_quadrants=(),
        leds_used=tuple(led for led, _ in levels), led_levels=levels, led_weights=weights,
        median=float(header["MEDIAN"]),
    )  # fmt: skip


def write_focalplane_factors(
    master_flat_paths: Mapping[int, str], out_path: str, *, provenance: Mapping[str, str] | None = None
) -> dict[str, Any]:
    """Compute the factors of one night and filter from its CCDs' master flats and write them as JSON."""
    flats = [_flat_record(path) for _ccdid, path in sorted(master_flat_paths.items())]
    factors = focalplane_factors(flats)
    content = {
        "night": flats[0].night if flats else None,
        "filtercode": flats[0].filtercode if flats else None,
        "factors": {str(ccdid): factor for ccdid, factor in sorted(factors.items())},
        "provenance": dict(provenance or {}),
    }
    write_atomically(Path(out_path), lambda handle: handle.write(json.dumps(content, sort_keys=True).encode()))
    return {"factors": content["factors"], "path": out_path}


def read_focalplane_factor(path: str, ccdid: int) -> float:
    """The factor of one CCD from a focal-plane JSON (NaN when the CCD took no part)."""
    content = json.loads(Path(path).read_text())
    return float(content["factors"].get(str(ccdid), "nan"))
