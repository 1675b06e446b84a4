"""``streamer starflat --start D --end D``: the relative response of each quadrant from the catalogues of a
range of nights (``streamer.work.starflat``), per filter: a CSV table, a PNG map and a summary.

Both flat normalisations come from the same catalogues: "ccd" (the fluxes as measured) always, and
"focalplane" (divided by each catalogue's ``focalplane_factor``) where the catalogues carry factors,
i.e. where they were made with ``[detrend] flat_normalisation = "focalplane"``. The variant is named in
every output.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from streamer.config import Config
from streamer.errors import StreamerError
from streamer.ledger import report as queries
from streamer.ledger.core import Ledger
from streamer.storage.atomic import write_atomically
from streamer.storage.naming import ccd_quadrant_of
from streamer.work import starflat
from streamer.work.report_figures import draw_rcid_map

TABLE_COLUMNS = ("variant", "filtercode", "rcid", "ccdid", "qid", "response", "error", "measurements", "stars")


class StarflatError(StreamerError):
    """Nothing to compare: no catalogue in the range, or no star measured twice."""


def run(config: Config, start: dt.date, end: dt.date, filtercode: str | None, out: Path, radius_px: float) -> int:
    """Fit each filter's responses, write ``starflat_<variant>_<filter>.csv`` and ``.png`` under ``out``."""
    with Ledger.open(config.storage.ledger_path, readonly=True) as ledger:
        rows = queries.catalogues_between(ledger, start.isoformat(), end.isoformat())
    filters = sorted({r["filtercode"] for r in rows if filtercode in (None, r["filtercode"])})
    if not filters:
        raise StarflatError(f"no catalogue on disk for {start}..{end}" + (f" in {filtercode}" if filtercode else ""))
    out.mkdir(parents=True, exist_ok=True)
    for band in filters:
        tables = [pq.read_table(config.storage.root / r["relpath"]) for r in rows if r["filtercode"] == band]
        for variant in variants_of(tables):
            _solve_one(tables, variant, band, f"{start}..{end}", out, radius_px)
    print(f"written: {out}")
    return 0


def variants_of(tables: list[pa.Table]) -> list[str]:
    """"ccd", and "focalplane" when some catalogue has a focal-plane factor."""
    has_factors = any(
        "focalplane_factor" in t.column_names and pc.any(pc.is_finite(t["focalplane_factor"])).as_py() for t in tables
    )
    return ["ccd", "focalplane"] if has_factors else ["ccd"]


def _solve_one(tables: list[pa.Table], variant: str, band: str, span: str, out: Path, radius_px: float) -> None:
    try:
        solution = starflat.solve(starflat.collect(tables, radius_px=radius_px, variant=variant))
    except ValueError as err:
        raise StarflatError(f"{band} ({variant} flat): {err}") from None
    stem = f"starflat_{variant}_{band}"
    _write_table(out / f"{stem}.csv", variant, band, solution)
    values = {q.rcid: q.response for q in solution.quadrants}
    draw_rcid_map(values, f"{span} {band} ({variant} flat): relative response", "response", out / f"{stem}.png")
    spread = max(values.values()) - min(values.values())
    print(f"{band} ({variant}): {len(values)} quadrants from {solution.stars} stars, {solution.measurements} "
          f"measurements on {solution.exposures} exposures; response {min(values.values()):.4f}..{max(values.values()):.4f} "
          f"(spread {spread:.4f}); residual scatter {solution.residual_scatter_mag:.4f} mag; "
          f"chi2/dof {solution.chi2_per_dof:.2f}; {solution.rejected} clipped")  # fmt: skip


def _write_table(path: Path, variant: str, band: str, solution: starflat.StarflatSolution) -> None:
    text = io.StringIO()
    writer = csv.writer(text)
    writer.writerow(TABLE_COLUMNS)
    for q in solution.quadrants:
        writer.writerow([variant, band, q.rcid, *ccd_quadrant_of(q.rcid), f"{q.response:.6f}", f"{q.error:.6f}",
                         q.measurements, q.stars])  # fmt: skip
    data = text.getvalue().encode()
    write_atomically(path, lambda handle: handle.write(data))
