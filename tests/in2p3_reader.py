"""How an IN2P3 consumer finds and reads an aperture catalogue, rebuilt from the IN2P3 code's facts.

Not our code: the path rule is ztfquery's local sciimg path (ztfquery/buildurl.py, ``science_path``,
joined to ``$ZTFDATA``) passed through ztfin2p3's ``ipacfilename_to_ztfin2p3filepath`` (ztfin2p3/io.py)
with ``new_suffix="apcat", new_extension="parquet"`` (ztfin2p3/scripts/detrend2aper.py); the
columns, their order and types are those ``get_aperture_photometry`` (ztfin2p3/aperture.py) writes
with ``cat="gaia_dr3"``, ``minimal_columns=True``, ``joined=True``.
"""

from __future__ import annotations

import os

import numpy as np

# ztfin2p3/aperture.py: _MINIMAL_COLNAMES["gaia_dr3"], then "isolated" (ztfimg/catalog.py get_isolated)
CATALOGUE_COLUMNS = ["source_id", "ra", "dec", "phot_g_mean_mag", "phot_bp_mean_mag", "phot_rp_mean_mag", "x", "y", "isolated"]


def in2p3_columns(n_radii: int) -> list[str]:
    """All f_k, then all f_k_e, all f_k_f (ztfimg/base.py _get_aperture), then all r_k (ztfin2p3/aperture.py)."""
    groups = [[f"f_{k}{suffix}" for k in range(n_radii)] for suffix in ("", "_e", "_f")]
    return CATALOGUE_COLUMNS + groups[0] + groups[1] + groups[2] + [f"r_{k}" for k in range(n_radii)]


def in2p3_dtypes(n_radii: int) -> dict[str, np.dtype]:
    """float64 catalogue columns and the aperture frame cast to float32; f_k_f and r_k to uint8."""
    types = {name: np.dtype(np.float32) for name in in2p3_columns(n_radii)}
    types["source_id"] = np.dtype(np.int64)
    types["isolated"] = np.dtype(bool)
    for k in range(n_radii):
        types[f"f_{k}_f"] = types[f"r_{k}"] = np.dtype(np.uint8)
    return types


def apcat_path(ztfdata: str, raw_filename: str, qid: int) -> str:
    """Where the IN2P3 code writes (and its consumers look for) the apcat of quadrant ``qid`` of a raw file."""
    _, ffd, field, filtercode, ccd, _code = raw_filename.split(".")[0].split("_")
    sciimg = os.path.join(
        ztfdata, f"sci/{ffd[:4]}/{ffd[4:8]}/{ffd[8:]}/ztf_{ffd}_{field}_{filtercode}_{ccd}_o_q{qid}_sciimg.fits"
    )
    filepath = sciimg.replace("/sci", "/ztfin2p3/sci").replace("/ztf_", "/ztfin2p3_")
    stem, _extension = os.path.splitext(filepath)
    *head, _suffix = stem.split("_")
    return "_".join([*head, "apcat"]) + ".parquet"
