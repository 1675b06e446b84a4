"""A crowded quadrant: the source discs must not mask the whole background (sep then returns 0)."""

from __future__ import annotations

import numpy as np
import pytest

from streamer.photometry import background_disc_radius, measure_apertures

SKY = 150.0
FLUX = 2000.0
SIGMA_PX = 0.85  # 2" FWHM at 1"/px


def _crowded_image(n_stars: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    ny, nx = 260, 256
    x = rng.uniform(15, nx - 15, n_stars)
    y = rng.uniform(15, ny - 15, n_stars)
    yy, xx = np.mgrid[0:ny, 0:nx]
    image = np.full((ny, nx), SKY)
    for xs, ys in zip(x, y, strict=True):  # the slow obvious model: every star on every pixel
        image += FLUX / (2 * np.pi * SIGMA_PX**2) * np.exp(-((xx - xs) ** 2 + (yy - ys) ** 2) / (2 * SIGMA_PX**2))
    image += rng.normal(0.0, 4.0, image.shape)
    return image.astype(np.float32), x, y


@pytest.mark.parametrize("n_stars", [20, 200])
def test_star_fluxes_are_recovered_whatever_the_crowding(n_stars: int) -> None:
    image, x, y = _crowded_image(n_stars, seed=5)
    variance = np.full(image.shape, 16.0, dtype=np.float32)
    mask = np.zeros(image.shape, dtype=np.int16)
    result = measure_apertures(image, variance, mask, 0, x, y, [3.0, 6.0, 12.0], background_box=(192, 220))
    # r = 3 px holds 1 - exp(-9 / (2 sigma^2)) of a Gaussian star; neighbours add a little in the crowded case
    expected = FLUX * (1 - np.exp(-9 / (2 * SIGMA_PX**2)))
    ratio = np.median(result.flux[:, 0]) / expected
    assert ratio == pytest.approx(1.0, abs=0.02)  # a background left at 0 gives ~ +2.1 (28 px of 150 ADU)


def test_the_disc_shrinks_only_when_the_boxes_would_be_too_masked() -> None:
    rejected = np.zeros((260, 256), dtype=bool)
    radii = np.array([3.0, 12.0])
    few = np.array([50.0, 150.0]), np.array([60.0, 200.0])
    assert background_disc_radius(rejected, *few, radii, (192, 220)) == 12.0
    rng = np.random.default_rng(2)
    many = rng.uniform(0, 256, 300), rng.uniform(0, 260, 300)  # 300 x 452 px discs > half of 66,560 px
    assert background_disc_radius(rejected, *many, radii, (192, 220)) == 3.0
    dense = rng.uniform(0, 256, 5000), rng.uniform(0, 260, 5000)  # even 3 px discs cover it twice
    assert background_disc_radius(rejected, *dense, radii, (192, 220)) == 0.0
    rejected[:, :200] = True  # most of every box already rejected
    assert background_disc_radius(rejected, *few, radii, (192, 220)) == 0.0
