"""Worker functions for the masters: read raw files, call the numerics, write master files atomically.

Inputs are paths (str) and small values, outputs small frozen records of plain values, so that
all of it crosses a process boundary by pickle. Frames are read quadrant by quadrant and
combined in row blocks: memory is one quadrant's outputs plus one block of rows per frame,
whatever the number of frames (never a (n_frames, 6160, 6144) stack).

Flats are built in two steps, so that the service can download one LED's frames, build, and
release them: :func:`build_led_flat` per LED, then :func:`combine_master_flat` per filter.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import hashlib
import json
import os
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from streamer import __version__
from streamer.config import HASH_NEUTRAL_DEFAULTS, DetrendConfig
from streamer.detrend import masks as maskbits
from streamer.detrend import nonlinearity
from streamer.detrend.calibrate import MasterQuadrant, RowCorrection, correct_rows, fit_overscan, pocket_step
from streamer.detrend.combine import ClippedMedian, combine_in_row_blocks
from streamer.detrend.selection import middle_values
from streamer.errors import StreamerError
from streamer.formats.masters import MasterReadError, read_master, read_master_header, write_master
from streamer.formats.raw import QuadrantReadError, RawFile, RawFileError, open_raw

BLOCK_ROWS = 128
RAW_BUDGET_BYTES = 512 * 2**20
"""Decoded raw quadrants (as stored, e.g. uint16) held at once while combining. Decoding a whole
quadrant costs half as much as decoding it band by band (astropy's tile sections), so frames are
decoded whole while n_frames x quadrant bytes fits this budget (about 27 uint16 quadrants), and
band by band beyond: memory stays bounded whatever the number of frames."""
FILTER_LEDS: Mapping[str, tuple[int, ...]] = {"zg": (2, 3, 4, 5), "zr": (7, 8, 9, 10), "zi": (11, 12, 13)}


class IncompleteCalibration(StreamerError):
    """Not enough usable frames for a master (or for any quadrant of it); ``reason`` says what."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(reason)


@dataclass(frozen=True)
class MasterResult:
    """A master written to ``path`` (kind "bias" or "flat")."""

    path: str
    kind: str
    night: str  # YYYY-MM-DD
    ccdid: int
    filtercode: str | None  # None for biases
    frames_used: tuple[str, ...]  # file names: raw biases, or the LED flat files
    frames_rejected: tuple[tuple[str, str], ...]  # (file name, reason)
    quadrants: tuple[int, ...]  # quadrants written
    failed_quadrants: tuple[tuple[int, str], ...]  # (qid, reason)
    leds_used: tuple[int, ...] = ()
    led_levels: tuple[tuple[int, float], ...] = ()  # flats: (LED, CCD-wide median of its stack, ADU)
    led_weights: tuple[tuple[int, float], ...] = ()
    median: float | None = None  # flats: CCD-wide median of the master (about 1; not divided out)
    masked_fraction: tuple[tuple[int, float], ...] = ()  # (qid, fraction of pixels with any bit set)
    n_bytes: int = 0
    timing: tuple[tuple[str, float], ...] = field(default=(), compare=False)  # (step, seconds)


@dataclass(frozen=True)
class LedFlatResult:
    """One LED's flat stack of one CCD, divided by its CCD-wide median ``level`` (ADU)."""

    path: str
    led: int
    night: str
    ccdid: int
    filtercode: str
    level: float
    frames_used: tuple[str, ...]
    frames_rejected: tuple[tuple[str, str], ...]
    quadrants: tuple[int, ...]
    failed_quadrants: tuple[tuple[int, str], ...]
    n_bytes: int = 0
    timing: tuple[tuple[str, float], ...] = field(default=(), compare=False)


class _Timer:
    """Seconds spent per step, accumulated."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    def add(self, step: str, since: float) -> float:
        now = time.perf_counter()
        self.seconds[step] = self.seconds.get(step, 0.0) + now - since
        return now

    def items(self) -> tuple[tuple[str, float], ...]:
        return tuple((step, round(seconds, 4)) for step, seconds in sorted(self.seconds.items()))


def _night(night: str | dt.date) -> dt.date:
    if isinstance(night, dt.date):
        return night
    try:
        return dt.date.fromisoformat(night)
    except (TypeError, ValueError):
        raise ValueError(f"night {night!r}: expected a date YYYY-MM-DD") from None


def detrend_config_hash(detrend: DetrendConfig) -> str:
    """A short stable hash of the detrending settings (recorded in every master); keys at their
    hash-neutral value (``config.HASH_NEUTRAL_DEFAULTS``) are left out."""
    settings = dataclasses.asdict(detrend)
    for (section, key), neutral in HASH_NEUTRAL_DEFAULTS.items():
        if section == "detrend" and settings.get(key) == neutral:
            del settings[key]
    payload = json.dumps(settings, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def _coefficients(detrend: DetrendConfig, night: dt.date, ccdid: int, qid: int) -> tuple[float, float] | None:
    return None if detrend.nonlinearity == "off" else nonlinearity.coefficients(night, ccdid, qid)


@dataclass
class _Frame:
    """A raw file being combined for one quadrant."""

    name: str
    raw: RawFile
    overscan: npt.NDArray[np.number]
    level: npt.NDArray[np.float64]
    nbytes: int  # of the decoded quadrant
    data: npt.NDArray[np.number] | None = None  # the whole quadrant, when the raw budget allows


class _QuadrantFailed(Exception):
    """A quadrant of a master that cannot be built (recorded in ``failed_quadrants``)."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(reason)


class _FrameFailed(Exception):
    def __init__(self, index: int, reason: str) -> None:
        self.index = index
        self.reason = reason


def _combine_quadrant(
    raws: Sequence[RawFile],
    qid: int,
    *,
    night: dt.date,
    ccdid: int,
    detrend: DetrendConfig,
    subtract: npt.NDArray[np.float32] | None,
    row_corrections: Sequence[RowCorrection],
    minimum: int,
    timer: _Timer,
    check_frame: Callable[[RawFile], str | None] | None = None,
) -> tuple[ClippedMedian, tuple[str, ...], list[tuple[str, str]], float | None, float | None]:
    """Clipped median of one quadrant over ``raws`` (overscan, nonlinearity, row corrections, minus
    ``subtract``), frames with an unreadable quadrant left out. Returns (combination, names used,
    (name, reason) rejected, gain, read noise); _QuadrantFailed if fewer than ``minimum`` remain.
    The pocket-effect step of ``detrend`` comes first among the row corrections."""
    coefficients = _coefficients(detrend, night, ccdid, qid)
    row_corrections = (*pocket_step(detrend, ccdid, qid, night).row_corrections, *row_corrections)
    rejected: list[tuple[str, str]] = []
    frames: list[_Frame] = []
    shape: tuple[int, int] | None = None
    gain = read_noise = None
    for raw in raws:
        name = os.path.basename(raw.path)
        started = time.perf_counter()
        try:
            problem = check_frame(raw) if check_frame is not None else None
            if problem is not None:
                rejected.append((name, problem))
                continue
            frame_shape = raw.data_shape(qid)
            frame_nbytes = raw.data_nbytes(qid)
            overscan = raw.overscan(qid)
            if gain is None:
                gain, read_noise = raw.amplifier(qid)
        except QuadrantReadError as err:
            rejected.append((name, err.reason))
            continue
        finally:
            started = timer.add("read", started)
        if shape is None:
            shape = frame_shape
        if frame_shape != shape or overscan.shape[0] != shape[0]:
            rejected.append((name, f"quadrant {qid} of shape {frame_shape}, overscan {overscan.shape}: expected {shape}"))
            continue
        try:
            # without the data: the frames are decoded in row bands later, and a refit for the pocket's
            # trail would decode each twice; biases carry no trail, an LED flat's few ADU are 1e-4 of it
            model = fit_overscan(overscan, qid, config=detrend, nonlinearity_coefficients=coefficients)
        except ValueError as err:
            rejected.append((name, f"quadrant {qid}: overscan unusable: {err}"))
            continue
        timer.add("correct", started)
        frames.append(_Frame(name, raw, overscan, model.level_stored, frame_nbytes))
    if subtract is not None and shape is not None and subtract.shape != shape:
        raise _QuadrantFailed(f"master bias quadrant {subtract.shape} does not match the frames' {shape}")
    decode_whole = sum(frame.nbytes for frame in frames) <= RAW_BUDGET_BYTES

    while True:
        if len(frames) < minimum or shape is None:
            raise _QuadrantFailed(f"{len(frames)} usable frames, fewer than the {minimum} required")
        columns = shape[1]

        buffer = np.empty((len(frames), BLOCK_ROWS, columns), dtype=np.float32)  # reused: combine copies

        def read_rows(start: int, stop: int) -> npt.NDArray[np.float32]:
            block = buffer[:, : stop - start]  # noqa: B023 (called within this round of the loop)
            for i, frame in enumerate(frames):
                started = time.perf_counter()
                try:
                    if decode_whole and frame.data is None:
                        frame.data = frame.raw.data(qid)
                    rows = frame.data[start:stop] if frame.data is not None else frame.raw.data_rows(qid, start, stop)
                except QuadrantReadError as err:
                    raise _FrameFailed(i, err.reason) from err
                started = timer.add("read", started)
                correct_rows(
                    rows,
                    frame.overscan[start:stop],
                    frame.level[start:stop],
                    qid,
                    nonlinearity=detrend.nonlinearity,
                    nonlinearity_coefficients=coefficients,
                    row_corrections=row_corrections,
                    out=block[i],
                )
                if subtract is not None:
                    block[i] -= subtract[start:stop]
                timer.add("correct", started)
            return block

        inner_before = timer.seconds.get("read", 0.0) + timer.seconds.get("correct", 0.0)
        started = time.perf_counter()
        try:
            combined = combine_in_row_blocks(read_rows, shape, clip_sigma=detrend.clip_sigma, block_rows=BLOCK_ROWS)
        except _FrameFailed as failure:
            rejected.append((frames[failure.index].name, failure.reason))
            del frames[failure.index]
            continue
        # the combining proper: the call's time less the reading and correcting done inside it
        inner = timer.seconds.get("read", 0.0) + timer.seconds.get("correct", 0.0) - inner_before
        timer.seconds["combine"] = timer.seconds.get("combine", 0.0) + time.perf_counter() - started - inner
        return combined, tuple(f.name for f in frames), rejected, gain, read_noise


def _masked_fraction(mask: npt.NDArray[np.uint16]) -> float:
    return round(float(np.count_nonzero(mask)) / mask.size, 6)


def _primary_cards(
    kind: str,
    night: dt.date,
    ccdid: int,
    filtercode: str | None,
    frames: Sequence[str],
    detrend: DetrendConfig,
    provenance: Mapping[str, str],
) -> dict[str, str | int | float | bool]:
    cards: dict[str, str | int | float | bool] = {
        "MKIND": kind,
        "NIGHT": night.isoformat(),
        "CCD_ID": ccdid,
        "NFRAMES": len(frames),
        "DTHASH": detrend_config_hash(detrend),
        "PKGVERS": __version__,
        "NLORDER": detrend.nonlinearity,
    }
    if filtercode is not None:
        cards["FILTER"] = filtercode
    if detrend.pocket != "off":
        cards["POCKET"] = detrend.pocket
        for qid in (1, 2, 3, 4):
            cards[f"POCKQ{qid}"] = pocket_step(detrend, ccdid, qid, night).summary()
    for i, name in enumerate(frames, start=1):
        cards[f"FRAME{i:03d}"] = name
    if "config_hash" in provenance:
        cards["CFGHASH"] = str(provenance["config_hash"])
    for key, value in sorted(provenance.items()):
        if key != "config_hash":
            cards[f"PROV_{key.upper()}"] = str(value)
    return cards


def build_master_bias(
    bias_paths: Sequence[str],
    out_path: str,
    *,
    night: str | dt.date,
    ccdid: int,
    detrend: DetrendConfig,
    provenance: Mapping[str, str] | None = None,
    row_corrections: Sequence[RowCorrection] = (),
) -> MasterResult:
    """Master bias of one CCD and night: clipped median of the given biases (the caller chose
    them, :mod:`streamer.rules.bias`), per quadrant, with its variance and HOT / NOISY /
    NO_CALIBRATION bits. IncompleteCalibration if there are fewer than ``min_bias_frames``, or
    no quadrant could be built."""
    night_date = _night(night)
    timer = _Timer()
    candidates = sorted(bias_paths, key=os.path.basename)
    if len(candidates) < detrend.min_bias_frames:
        raise IncompleteCalibration(
            f"CCD {ccdid} night {night_date}: {len(candidates)} biases: "
            f"fewer than the {detrend.min_bias_frames} required"
        )
    quadrants: dict[int, MasterQuadrant] = {}
    failed: list[tuple[int, str]] = []
    rejected: dict[str, str] = {}
    used: set[str] = set()
    quadrant_cards: dict[int, dict[str, str | int | float | bool | None]] = {}
    with ExitStack() as stack:
        raws: list[RawFile] = []
        for path in candidates:
            started = time.perf_counter()
            try:
                raws.append(stack.enter_context(open_raw(path)))
            except RawFileError as err:
                rejected[os.path.basename(path)] = err.reason
            timer.add("read", started)
        for qid in (1, 2, 3, 4):
            try:
                combined, names, quadrant_rejected, gain, read_noise = _combine_quadrant(
                    raws,
                    qid,
                    night=night_date,
                    ccdid=ccdid,
                    detrend=detrend,
                    subtract=None,
                    row_corrections=row_corrections,
                    minimum=detrend.min_bias_frames,
                    timer=timer,
                )
            except _QuadrantFailed as err:
                failed.append((qid, err.reason))
                continue
            for name, reason in quadrant_rejected:
                rejected.setdefault(name, f"quadrant {qid}: {reason}")
            used.update(names)
            started = time.perf_counter()
            mask = maskbits.flag_bias_pixels(combined.median, combined.sample_variance, combined.n_used)
            quadrants[qid] = MasterQuadrant(combined.median, combined.variance, mask)
            quadrant_cards[qid] = {"NFRAMES": len(names), "GAIN": gain, "READNOI": read_noise}
            timer.add("mask", started)
    if not quadrants:
        raise IncompleteCalibration(
            f"CCD {ccdid} night {night_date}: no quadrant of the master bias could be built: "
            + "; ".join(f"q{qid}: {reason}" for qid, reason in failed)
        )
    frames = tuple(sorted(used))
    started = time.perf_counter()
    n_bytes = write_master(
        out_path,
        quadrants,
        primary_cards=_primary_cards("bias", night_date, ccdid, None, frames, detrend, provenance or {}),
        quadrant_cards=quadrant_cards,
    )
    timer.add("write", started)
    return MasterResult(
        path=out_path,
        kind="bias",
        night=night_date.isoformat(),
        ccdid=ccdid,
        filtercode=None,
        frames_used=frames,
        frames_rejected=tuple(sorted(rejected.items())),
        quadrants=tuple(sorted(quadrants)),
        failed_quadrants=tuple(failed),
        masked_fraction=tuple((qid, _masked_fraction(q.mask)) for qid, q in sorted(quadrants.items())),
        n_bytes=n_bytes,
        timing=timer.items(),
    )


def _ccd_median(arrays: Sequence[npt.NDArray[np.float32]]) -> float:
    """Median of the finite values of several quadrants together (exact)."""
    middle = middle_values(arrays)
    return float("nan") if middle is None else 0.5 * (float(middle[0]) + float(middle[1]))


def build_led_flat(
    flat_paths: Sequence[str],
    master_bias_path: str,
    out_path: str,
    *,
    led: int,
    night: str | dt.date,
    ccdid: int,
    filtercode: str,
    detrend: DetrendConfig,
    provenance: Mapping[str, str] | None = None,
    row_corrections: Sequence[RowCorrection] = (),
) -> LedFlatResult:
    """One LED's flat of one CCD: bias-subtracted clipped median of its frames, per quadrant,
    divided by its CCD-wide median (recorded as ``level``, ADU). The variance includes the master
    bias' (common to all frames). Frames whose ``ILUM_LED`` says another LED are left out.
    IncompleteCalibration if fewer than ``min_flats_per_led`` usable frames."""
    night_date = _night(night)
    timer = _Timer()
    if filtercode in FILTER_LEDS and led not in FILTER_LEDS[filtercode]:
        raise ValueError(f"LED {led} does not belong to filter {filtercode} (LEDs {FILTER_LEDS[filtercode]})")
    if len(flat_paths) < detrend.min_flats_per_led:
        raise IncompleteCalibration(
            f"CCD {ccdid} night {night_date} LED {led}: {len(flat_paths)} flats, fewer than the {detrend.min_flats_per_led} required"
        )

    def check_led(raw: RawFile) -> str | None:
        value = raw.primary_header.get("ILUM_LED")
        if value is not None and value != led:
            return f"ILUM_LED = {value}, expected {led}"
        return None

    stacks: dict[int, tuple[npt.NDArray[np.float32], npt.NDArray[np.float32], npt.NDArray[np.uint16]]] = {}
    failed: list[tuple[int, str]] = []
    rejected: dict[str, str] = {}
    used: set[str] = set()
    with ExitStack() as stack:
        raws: list[RawFile] = []
        for path in sorted(flat_paths, key=os.path.basename):
            started = time.perf_counter()
            try:
                raws.append(stack.enter_context(open_raw(path)))
            except RawFileError as err:
                rejected[os.path.basename(path)] = err.reason
            timer.add("read", started)
        for qid in (1, 2, 3, 4):
            started = time.perf_counter()
            try:
                bias = read_master(master_bias_path, qid)
            except MasterReadError as err:
                failed.append((qid, f"master bias: {err}"))
                continue
            timer.add("read", started)
            try:
                combined, names, quadrant_rejected, _, _ = _combine_quadrant(
                    raws,
                    qid,
                    night=night_date,
                    ccdid=ccdid,
                    detrend=detrend,
                    subtract=bias.data,
                    row_corrections=row_corrections,
                    minimum=detrend.min_flats_per_led,
                    timer=timer,
                    check_frame=check_led,
                )
            except _QuadrantFailed as err:
                failed.append((qid, err.reason))
                continue
            for name, reason in quadrant_rejected:
                rejected.setdefault(name, f"quadrant {qid}: {reason}")
            used.update(names)
            variance = combined.variance + bias.variance  # ADU^2: frame scatter + the common bias error
            mask = bias.mask | np.where(combined.n_used == 0, maskbits.NO_CALIBRATION, 0).astype(np.uint16)
            stacks[qid] = (combined.median, variance, mask)
        if not stacks:
            raise IncompleteCalibration(
                f"CCD {ccdid} night {night_date} LED {led}: no quadrant could be built: "
                + "; ".join(f"q{qid}: {reason}" for qid, reason in failed)
            )
    started = time.perf_counter()
    level = _ccd_median([data for data, _, _ in stacks.values()])
    if not level > 0:
        raise IncompleteCalibration(f"CCD {ccdid} night {night_date} LED {led}: flat level {level} ADU is not positive")
    quadrants = {
        qid: MasterQuadrant((data / np.float32(level)).astype(np.float32), (variance / np.float32(level**2)).astype(np.float32), mask)
        for qid, (data, variance, mask) in stacks.items()
    }
    del stacks
    timer.add("combine", started)
    frames = tuple(sorted(used))
    cards = _primary_cards("ledflat", night_date, ccdid, filtercode, frames, detrend, provenance or {})
    cards |= {"LED": led, "LEDS": str(led), "NORMFACT": level, f"LEV{led:02d}": level}
    started = time.perf_counter()
    n_bytes = write_master(out_path, quadrants, primary_cards=cards)
    timer.add("write", started)
    return LedFlatResult(
        path=out_path,
        led=led,
        night=night_date.isoformat(),
        ccdid=ccdid,
        filtercode=filtercode,
        level=level,
        frames_used=frames,
        frames_rejected=tuple(sorted(rejected.items())),
        quadrants=tuple(sorted(quadrants)),
        failed_quadrants=tuple(failed),
        n_bytes=n_bytes,
        timing=timer.items(),
    )


def combine_master_flat(
    led_flat_paths: Mapping[int, str],
    out_path: str,
    *,
    night: str | dt.date,
    ccdid: int,
    filtercode: str,
    detrend: DetrendConfig,
    weights: Mapping[int, float] | None = None,
    provenance: Mapping[str, str] | None = None,
) -> MasterResult:
    """Master flat of one CCD, night and filter from its LED flats ({LED: path}).

    Per quadrant: the weighted mean of the LED flats present (weights: ``weights``, else
    ``detrend.led_weights``, else equal; variance sum(w^2 var) / sum(w)^2). Each LED flat was
    normalised by its own CCD-wide median (its ``level``, recorded here per LED); the mean is not
    normalised again (as in the IN2P3 algorithm), its CCD-wide median (about 1) is recorded; mask:
    DEAD, LOW/HIGH_RESPONSIVITY, NO_CALIBRATION from the master, OR the LED flats' masks (which
    carry the master bias' bits). IncompleteCalibration without any LED flat.
    """
    night_date = _night(night)
    timer = _Timer()
    if not led_flat_paths:
        raise IncompleteCalibration(f"CCD {ccdid} night {night_date} filter {filtercode}: no LED flat")
    configured = dict(detrend.led_weights)
    led_weights = {
        led: float((weights or {}).get(led, configured.get(led, 1.0))) for led in sorted(led_flat_paths)
    }
    if any(not w > 0 for w in led_weights.values()):
        raise ValueError(f"LED weights {led_weights}: expected positive numbers")
    levels: dict[int, float] = {}
    for led, path in sorted(led_flat_paths.items()):
        header = read_master_header(path)
        if header.get("MKIND") != "ledflat" or header.get("LED") != led:
            raise ValueError(f"{path}: not the LED flat of LED {led} (MKIND {header.get('MKIND')}, LED {header.get('LED')})")
        levels[led] = float(header["NORMFACT"])

    sums: dict[int, tuple[npt.NDArray[np.float32], npt.NDArray[np.float32], npt.NDArray[np.uint16]]] = {}
    failed: list[tuple[int, str]] = []
    used_leds: set[int] = set()
    for qid in (1, 2, 3, 4):
        weighted: npt.NDArray[np.float32] | None = None
        variance: npt.NDArray[np.float32] | None = None
        mask: npt.NDArray[np.uint16] | None = None
        total_weight = 0.0
        reasons = []
        for led, path in sorted(led_flat_paths.items()):
            started = time.perf_counter()
            try:
                flat = read_master(path, qid)
            except MasterReadError as err:
                reasons.append(f"LED {led}: {err}")
                continue
            started = timer.add("read", started)
            w = led_weights[led]
            if weighted is None or variance is None or mask is None:
                weighted = flat.data * np.float32(w)
                variance = flat.variance * np.float32(w * w)
                mask = flat.mask.copy()
            else:
                weighted += flat.data * np.float32(w)
                variance += flat.variance * np.float32(w * w)
                mask |= flat.mask
            total_weight += w
            used_leds.add(led)
            timer.add("combine", started)
        if weighted is None or variance is None or mask is None:
            failed.append((qid, "; ".join(reasons) or "no LED flat has this quadrant"))
            continue
        weighted /= np.float32(total_weight)
        variance /= np.float32(total_weight**2)
        sums[qid] = (weighted, variance, mask)
    if not sums:
        raise IncompleteCalibration(
            f"CCD {ccdid} night {night_date} filter {filtercode}: no quadrant in the LED flats: "
            + "; ".join(f"q{qid}: {reason}" for qid, reason in failed)
        )
    started = time.perf_counter()
    median = _ccd_median([data for data, _, _ in sums.values()])
    if not median > 0:
        raise IncompleteCalibration(f"CCD {ccdid} night {night_date} filter {filtercode}: flat median {median} is not positive")
    quadrants: dict[int, MasterQuadrant] = {}
    for qid, (data, variance, mask) in sums.items():
        mask |= maskbits.flag_flat_pixels(data)
        quadrants[qid] = MasterQuadrant(data, variance, mask)
    del sums
    timer.add("mask", started)
    leds = tuple(sorted(used_leds))
    frames = tuple(os.path.basename(led_flat_paths[led]) for led in leds)
    cards = _primary_cards("flat", night_date, ccdid, filtercode, frames, detrend, provenance or {})
    cards |= {"LEDS": ",".join(str(led) for led in leds), "MEDIAN": median}
    for led in leds:
        cards[f"LEV{led:02d}"] = levels[led]
        cards[f"WLED{led:02d}"] = led_weights[led]
    started = time.perf_counter()
    n_bytes = write_master(out_path, quadrants, primary_cards=cards)
    timer.add("write", started)
    return MasterResult(
        path=out_path,
        kind="flat",
        night=night_date.isoformat(),
        ccdid=ccdid,
        filtercode=filtercode,
        frames_used=frames,
        frames_rejected=(),
        quadrants=tuple(sorted(quadrants)),
        failed_quadrants=tuple(failed),
        leds_used=leds,
        led_levels=tuple((led, levels[led]) for led in leds),
        led_weights=tuple((led, led_weights[led]) for led in leds),
        median=median,
        masked_fraction=tuple((qid, _masked_fraction(q.mask)) for qid, q in sorted(quadrants.items())),
        n_bytes=n_bytes,
        timing=timer.items(),
    )


def focalplane_factors(flats: Sequence[MasterResult]) -> dict[int, float]:
    """Focal-plane flat factors {ccdid: factor} for the master flats of one night and filter.

    With ``flat_normalisation = "focalplane"`` a science quadrant is divided by
    ``master_flat * factor``, i.e. by the flat normalised by the focal plane's median instead of
    its own CCD's. For each LED, a CCD's relative level is its stack's CCD-wide median over the
    median of those of all the CCDs present with that LED (the median of CCD medians stands for
    the median of all pixels); a CCD's factor is the weighted mean of its LEDs' relative levels
    (exact when a CCD's relative level is the same for all LEDs). CCDs missing that night simply do
    not take part.
    """
    if not flats:
        return {}
    keys = {(f.night, f.filtercode) for f in flats}
    if len(keys) != 1 or any(f.kind != "flat" for f in flats):
        raise ValueError(f"expected master flats of one night and filter, got {sorted(map(str, keys))}")
    if len({f.ccdid for f in flats}) != len(flats):
        raise ValueError("two master flats for the same CCD")
    by_led: dict[int, list[float]] = {}
    for flat in flats:
        for led, level in flat.led_levels:
            by_led.setdefault(led, []).append(level)
    focal_plane_level = {led: float(np.median(levels)) for led, levels in by_led.items()}
    factors: dict[int, float] = {}
    for flat in flats:
        weights = dict(flat.led_weights)
        relative = [(weights.get(led, 1.0), level / focal_plane_level[led]) for led, level in flat.led_levels]
        total = sum(w for w, _ in relative)
        if total <= 0:
            raise ValueError(f"{flat.path}: no LED levels recorded")
        factors[flat.ccdid] = sum(w * r for w, r in relative) / total
    return factors


def build_master_flat(
    flat_paths_by_led: Mapping[int, Sequence[str]],
    master_bias_path: str,
    out_path: str,
    *,
    night: str | dt.date,
    ccdid: int,
    filtercode: str,
    detrend: DetrendConfig,
    weights: Mapping[int, float] | None = None,
    provenance: Mapping[str, str] | None = None,
    row_corrections: Sequence[RowCorrection] = (),
) -> MasterResult:
    """A filter's master flat in one call, when all its LEDs' frames are on disk at once:
    :func:`build_led_flat` per LED (temporary files beside ``out_path``, removed afterwards), then
    :func:`combine_master_flat`. LEDs with too few usable frames are left out and listed in
    ``frames_rejected`` as ("LED n", reason); IncompleteCalibration when no LED is left."""
    led_paths: dict[int, str] = {}
    skipped: list[tuple[str, str]] = []
    directory = os.path.dirname(os.path.abspath(out_path))
    base = os.path.basename(out_path)
    try:
        for led, paths in sorted(flat_paths_by_led.items()):
            temporary = os.path.join(directory, f".{base}.led{led:02d}.part")
            try:
                build_led_flat(
                    paths, master_bias_path, temporary, led=led, night=night, ccdid=ccdid, filtercode=filtercode,
                    detrend=detrend, provenance=provenance, row_corrections=row_corrections,
                )  # fmt: skip
            except IncompleteCalibration as err:
                skipped.append((f"LED {led}", err.reason))
                continue
            led_paths[led] = temporary
        if not led_paths:
            raise IncompleteCalibration(
                f"CCD {ccdid} night {_night(night)} filter {filtercode}: no LED with at least {detrend.min_flats_per_led} usable "
                f"frames: " + "; ".join(reason for _, reason in skipped)
            )
        result = combine_master_flat(
            led_paths, out_path, night=night, ccdid=ccdid, filtercode=filtercode, detrend=detrend, weights=weights,
            provenance=provenance,
        )  # fmt: skip
    finally:
        for path in led_paths.values():
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
    return dataclasses.replace(result, frames_rejected=tuple(skipped))
