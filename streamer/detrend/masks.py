"""Our own pixel mask: bit definitions and bad-pixel detection from the masters and the raw frame.

Bits (uint16). Where IPAC's mskimg has the same meaning we use the same bit, so that
``ipac_mask | our_mask`` can be tested with one set of reject bits (the default
``photometry.mask_reject_bits`` = 6141 covers bits 2, 3, 4, 8, 9, 10). IPAC reserves bits 13-15;
we use 13 and 14 for flags IPAC has no bit for, and they should be rejected too
(``REJECT_OWN`` = all our bits).

====  =====================  ====================================================================
bit   name                   meaning
====  =====================  ====================================================================
2     LOW_RESPONSIVITY       master flat below ``low_below`` x its local median (and not dead)
3     HIGH_RESPONSIVITY      master flat above ``high_above`` x its local median
4     NOISY                  bias frames scatter far more than typical (chi2 test, p ~ 1e-6)
8     SATURATED              raw value at the ADC ceiling, or detrended value >= SATURATE
9     DEAD                   master flat below ``dead_below`` x its local median
10    NAN                    non-finite detrended value (or a non-positive / non-finite flat)
13    HOT                    master bias level far from its local median (either sign), > 5 sigma
14    NO_CALIBRATION         a master had no usable value for the pixel (too few frames)
====  =====================  ====================================================================
"""

from __future__ import annotations

import math
from typing import TypeVar

import numpy as np
import numpy.typing as npt

from streamer.detrend.combine import chi2_median_ratio
from streamer.detrend.overscan import nmad

ScalarT = TypeVar("ScalarT", bound=np.generic)

LOW_RESPONSIVITY = 1 << 2
HIGH_RESPONSIVITY = 1 << 3
NOISY = 1 << 4
SATURATED = 1 << 8
DEAD = 1 << 9
NAN = 1 << 10
HOT = 1 << 13
NO_CALIBRATION = 1 << 14

BIT_NAMES: dict[int, str] = {
    2: "LOW_RESPONSIVITY",
    3: "HIGH_RESPONSIVITY",
    4: "NOISY",
    8: "SATURATED",
    9: "DEAD",
    10: "NAN",
    13: "HOT",
    14: "NO_CALIBRATION",
}
REJECT_OWN = sum(1 << bit for bit in BIT_NAMES)

DEFAULT_BOX = 64  # px, side of the boxes of the local median
HOT_NSIGMA = 5.0
NOISY_Z = 4.753  # one-sided Gaussian quantile of p = 1e-6
DEAD_BELOW = 0.5
LOW_BELOW = 0.9
HIGH_ABOVE = 1.1


SAMPLE_LIMIT = 1_000_000  # pixels: typical values (NMAD, median variance) come from a regular subsample


def _subsample(values: npt.NDArray[ScalarT]) -> npt.NDArray[ScalarT]:
    """Every k-th value of a 1-D selection, at most about SAMPLE_LIMIT of them (a fixed, regular pick)."""
    step = max(1, values.size // SAMPLE_LIMIT)
    return values[::step]


def local_median(image: npt.NDArray[np.floating], box: int = DEFAULT_BOX) -> npt.NDArray[np.float32]:
    """Median of the finite values in ``box`` x ``box`` tiles, expanded back to the image's shape.

    A cheap background for relative tests. When the shape does not divide, the last tiles are
    completed by reflection (all values finite) or are smaller (otherwise).
    """
    if image.ndim != 2:
        raise ValueError(f"image of shape {image.shape}: expected 2-D")
    rows, columns = image.shape
    n_r, n_c = -(-rows // box), -(-columns // box)
    if np.isfinite(image).all():
        # the common case: a partition instead of a sort; the last, partial tiles are filled by
        # reflecting the image, i.e. with pixels of their own neighbourhood
        padded = np.pad(np.asarray(image, dtype=np.float32), ((0, n_r * box - rows), (0, n_c * box - columns)), mode="reflect")
        tiles = padded.reshape(n_r, box, n_c, box).transpose(0, 2, 1, 3).reshape(n_r, n_c, box * box)
        half = box * box // 2
        tiles.partition((half - 1, half), axis=2)
        medians = (0.5 * (tiles[..., half - 1] + tiles[..., half])).astype(np.float32)
    else:
        padded = np.full((n_r * box, n_c * box), np.nan, dtype=np.float32)
        padded[:rows, :columns] = image
        tiles = padded.reshape(n_r, box, n_c, box).transpose(0, 2, 1, 3).reshape(n_r, n_c, box * box)
        with np.errstate(all="ignore"):
            finite = np.isfinite(tiles)
            counts = finite.sum(axis=2)
            tiles = np.where(finite, tiles, np.inf)
            tiles.sort(axis=2)
            lower = np.take_along_axis(tiles, np.maximum((counts - 1) // 2, 0)[..., np.newaxis], axis=2)[..., 0]
            upper = np.take_along_axis(tiles, np.maximum(counts // 2, 0)[..., np.newaxis], axis=2)[..., 0]
            medians = np.where(counts > 0, 0.5 * (lower + upper), np.nan).astype(np.float32)
    expanded = np.repeat(np.repeat(medians, box, axis=0), box, axis=1)
    return np.ascontiguousarray(expanded[:rows, :columns])


def flag_bias_pixels(
    master_bias: npt.NDArray[np.floating],
    sample_variance: npt.NDArray[np.floating],
    n_used: npt.NDArray[np.integer],
    *,
    hot_nsigma: float = HOT_NSIGMA,
    noisy_z: float = NOISY_Z,
    box: int = DEFAULT_BOX,
) -> npt.NDArray[np.uint16]:
    """HOT, NOISY and NO_CALIBRATION bits from a master bias (ADU), the sample variance of its frames
    (ADU^2, per pixel) and the number of frames kept per pixel.

    HOT: ``|bias - local median| > hot_nsigma x NMAD`` of that residual over the quadrant
    (NMAD and typical variance from a regular subsample of at most a million pixels).
    NOISY: sample variance above the typical variance times the upper p ~ 1e-6 quantile of
    chi2(k - 1) / (k - 1) (Wilson-Hilferty), k the frames kept; needs k >= 3.
    """
    if not master_bias.shape == sample_variance.shape == n_used.shape:
        raise ValueError(f"shapes differ: {master_bias.shape}, {sample_variance.shape}, {n_used.shape}")
    mask = np.zeros(master_bias.shape, dtype=np.uint16)
    usable = np.isfinite(master_bias) & (n_used > 0)
    mask[~usable] |= NO_CALIBRATION

    residual = np.asarray(master_bias, dtype=np.float32) - local_median(master_bias, box)
    scatter = nmad(_subsample(residual[usable]))
    if math.isfinite(scatter) and scatter > 0:
        with np.errstate(invalid="ignore"):
            mask[usable & (np.abs(residual) > hot_nsigma * scatter)] |= HOT

    testable = usable & (n_used >= 3) & np.isfinite(sample_variance)
    if testable.any():
        k_max = int(n_used.max())
        dof_typical = int(np.median(_subsample(n_used[testable]))) - 1
        typical = float(np.median(_subsample(sample_variance[testable]))) / chi2_median_ratio(dof_typical)
        # the upper p ~ 1e-6 quantile of chi2(k - 1) / (k - 1), tabulated by k
        dof = np.maximum(np.arange(k_max + 1) - 1, 1).astype(np.float64)
        h = 2.0 / (9.0 * dof)
        threshold = (typical * (1.0 - h + noisy_z * np.sqrt(h)) ** 3).astype(np.float32)
        with np.errstate(invalid="ignore"):
            noisy = sample_variance > threshold[np.clip(n_used, 0, k_max)]
        mask[testable & noisy] |= NOISY
    return mask


def flag_flat_pixels(
    master_flat: npt.NDArray[np.floating],
    *,
    dead_below: float = DEAD_BELOW,
    low_below: float = LOW_BELOW,
    high_above: float = HIGH_ABOVE,
    box: int = DEFAULT_BOX,
) -> npt.NDArray[np.uint16]:
    """DEAD, LOW_RESPONSIVITY, HIGH_RESPONSIVITY and NO_CALIBRATION bits from a master flat
    (dimensionless), each pixel compared with the median of its ``box`` x ``box`` tile."""
    if not 0 < dead_below <= low_below < 1 < high_above:
        raise ValueError(f"thresholds {dead_below}, {low_below}, {high_above}: expected 0 < dead <= low < 1 < high")
    flat = np.asarray(master_flat, dtype=np.float32)
    mask = np.zeros(flat.shape, dtype=np.uint16)
    background = local_median(flat, box)
    with np.errstate(invalid="ignore", divide="ignore"):
        relative = flat / background
        usable = np.isfinite(relative)
        mask[~usable] |= NO_CALIBRATION
        dead = usable & (relative < dead_below)
        mask[dead] |= DEAD
        mask[usable & ~dead & (relative < low_below)] |= LOW_RESPONSIVITY
        mask[usable & (relative > high_above)] |= HIGH_RESPONSIVITY
    return mask


def flag_science_pixels(
    raw_data: npt.NDArray[np.number],
    image: npt.NDArray[np.floating],
    *,
    saturate: float | None,
    raw_ceiling: float | None = 65535.0,
) -> npt.NDArray[np.uint16]:
    """SATURATED (raw >= ``raw_ceiling`` ADU, or image >= ``saturate`` ADU when given) and NAN bits."""
    if raw_data.shape != image.shape:
        raise ValueError(f"raw {raw_data.shape} and image {image.shape}: shapes differ")
    mask = np.zeros(image.shape, dtype=np.uint16)
    with np.errstate(invalid="ignore"):
        saturated = np.zeros(image.shape, dtype=bool)
        if raw_ceiling is not None:
            saturated |= raw_data >= raw_ceiling
        if saturate is not None:
            saturated |= image >= saturate
    mask[saturated] |= SATURATED
    mask[~np.isfinite(image)] |= NAN
    return mask


def describe(mask_value: int) -> list[str]:
    """Names of the bits set in one mask value."""
    return [name for bit, name in BIT_NAMES.items() if mask_value & (1 << bit)]
