"""Geometry helpers and augmentations of mcf.data.transforms."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch

from mcf.data import transforms as T
from mcf.params import ParamsError, build


def test_box_matrix_maps_the_box_onto_the_crop() -> None:
    m = T.box_matrix(np.array([10.0, 50.0, 20.0, 100.0]), 512)  # left, right, top, bottom
    np.testing.assert_allclose(T.apply(m, np.array([[10.0, 20.0], [50.0, 100.0], [30.0, 60.0]])),
                               [[0, 0], [512, 512], [256, 256]])
    with pytest.raises(ValueError, match="degenerate box"):
        T.box_matrix(np.array([10.0, 10.0, 0.0, 5.0]), 64)


def test_similarity_recovers_a_known_transform_and_never_reflects() -> None:
    m = T.around((100.0, 50.0), 0.7, 1.3, (5.0, -7.0))
    src = np.random.default_rng(0).uniform(0, 200, (5, 2))
    np.testing.assert_allclose(T.similarity(src, T.apply(m, src)), m, atol=1e-9)
    mirrored = src * [-1.0, 1.0]
    assert np.linalg.det(T.similarity(src, mirrored)[:, :2]) > 0


def test_compose_invert_apply_agree() -> None:
    a, b = T.around((1.0, 2.0), 0.3, 2.0, (3.0, 4.0)), T.box_matrix(np.array([0, 10, 0, 20]), 64)
    p = np.random.default_rng(1).uniform(-50, 50, (7, 2))
    np.testing.assert_allclose(T.apply(T.compose(a, b), p), T.apply(a, T.apply(b, p)))
    np.testing.assert_allclose(T.apply(T.invert(a), T.apply(a, p)), p, atol=1e-12)
    batched = T.apply(np.stack([a, b]), np.stack([p, p]))
    np.testing.assert_allclose(batched[1], T.apply(b, p))


def test_warp_affine_follows_the_pixel_convention() -> None:
    """A single bright pixel j (spanning [j, j+1)) lands where the matrix sends its centre j + 0.5."""
    img = np.zeros((40, 40), np.uint8)
    img[13, 7] = 255
    m = T.around((20.0, 20.0), 0.3, 2.0, (20.0, 20.0))
    out = T.warp_affine(img, m, 80).astype(float)
    ys, xs = np.mgrid[:80, :80] + 0.5
    centre = [(out * xs).sum() / out.sum(), (out * ys).sum() / out.sum()]
    np.testing.assert_allclose(centre, T.apply(m, np.array([[7.5, 13.5]]))[0], atol=0.05)


def test_tanh_warp_forward_inverse_exact_and_shape() -> None:
    rng = np.random.default_rng(2)
    pts = np.concatenate([rng.uniform(-1000, 1500, (500, 2)), [[256.0, 256.0]]])  # up to ~7 half sides
    fwd = T.tanh_warp_forward(pts, 0.8, 512)
    assert ((fwd > 0) & (fwd < 512)).all()  # the whole plane lands inside the warped square
    np.testing.assert_allclose(T.tanh_warp_inverse(fwd, 0.8, 512), pts, atol=1e-6)
    np.testing.assert_allclose(fwd[-1], [256, 256])
    # FaRL's warp, each axis on its own: linear within 0.2 half sides of the centre, then tanh
    inner = np.array([[256.0 + 0.19 * 256, 256.0 - 0.1 * 256]])
    np.testing.assert_allclose(T.tanh_warp_forward(inner, 0.8, 512), inner)
    edge = 256 * (1 - (0.2 + 0.8 * np.tanh(1.0)))  # the aligned square's left edge, at 0.81 half sides
    np.testing.assert_allclose(T.tanh_warp_forward(np.array([[0.0, 256.0]]), 0.8, 512), [[edge, 256]])
    v = 256 * (0.2 + 0.8 * np.tanh(0.375))  # half way out, by hand: 0.2 + 0.8 tanh((0.5 - 0.2) / 0.8)
    half_way = T.tanh_warp_forward(np.array([[384.0, 128.0]]), 0.8, 512)
    np.testing.assert_allclose(half_way, [[256 + v, 256 - v]])
    rim = T.tanh_warp_inverse(np.array([[0.0, 512.0]]), 0.8, 512)  # atanh(1) is inf: capped, far out
    assert np.isfinite(rim).all() and rim[0, 0] < -2000 and rim[0, 1] > 2500


def test_tanh_warp_warp_places_a_dot_where_the_points_go() -> None:
    img = np.zeros((300, 260, 3), np.uint8)
    cv2.circle(img, (int((90 - 0.5) * 16), int((140 - 0.5) * 16)), 4 * 16, (255, 255, 255), -1,
               cv2.LINE_AA, shift=4)
    m = T.around((130.0, 150.0), 0.2, 1.8, (126.0, 106.0))  # original → aligned 512²
    out = T.tanh_warp_warp(img, m, 0.8, 512, 256)[..., 0].astype(float)
    ys, xs = np.mgrid[:256, :256] + 0.5
    centre = np.array([(out * xs).sum(), (out * ys).sum()]) / out.sum()
    expect = T.tanh_warp_forward(T.apply(m, np.array([[90.0, 140.0]])), 0.8, 512)[0] / 2
    np.testing.assert_allclose(centre, expect, atol=0.3)


def test_tanh_warp_unwarp_reads_maps_back() -> None:
    """A smooth map warped and read back reproduces itself on the original grid."""
    h, w = 120, 100
    ys, xs = np.mgrid[:h, :w] + 0.5
    field = np.stack([np.sin(xs / 15.0), np.cos(ys / 11.0)]).astype(np.float32)  # [2, H, W]
    m = T.around((50.0, 60.0), -0.3, 3.0, (206.0, 196.0))
    warped = np.stack([T.tanh_warp_warp(f, m, 0.8, 512, 512) for f in field])
    back = T.tanh_warp_unwarp(torch.from_numpy(warped), m, 0.8, 512, (h, w)).numpy()
    assert back.shape == (2, h, w)
    inner = np.s_[:, 10:-10, 10:-10]
    assert np.abs(back - field)[inner].max() < 0.02


@pytest.mark.parametrize("map_size", [32, 64, 100])
def test_tanh_warp_unwarp_reads_each_pixel_where_the_warp_sends_its_centre(map_size: int) -> None:
    """Maps holding their own warped coordinates (a ramp: a pixel's value is its centre) read back, on
    every original pixel, the warped position of that pixel's centre (matrix, then warp), whatever the
    maps' size: the module's pixel convention, exact to float32, not to within half a map pixel."""
    h, w, warp_size = 90, 70, 64
    c = (np.arange(map_size) + 0.5) * (warp_size / map_size)
    ramps = torch.from_numpy(np.stack(np.broadcast_arrays(c[None, :], c[:, None])).astype(np.float32))
    m = T.around((35.0, 45.0), 0.4, 0.9, (-3.0, -13.0))  # original → aligned 64²
    back = T.tanh_warp_unwarp(ramps, m, 0.8, warp_size, (h, w)).numpy()
    ys, xs = np.mgrid[:h, :w] + 0.5
    centres = np.stack([xs, ys], axis=-1).reshape(-1, 2)
    expect = T.tanh_warp_forward(T.apply(m, centres), 0.8, warp_size).reshape(h, w, 2).transpose(2, 0, 1)
    inside = ((expect > c[0]) & (expect < c[-1])).all(axis=0)  # between the maps' outer pixel centres
    assert inside.mean() > 0.5
    np.testing.assert_allclose(back[:, inside], expect[:, inside], atol=1e-3)


def test_tanh_warp_unwarp_reads_the_outer_map_pixel_beyond_the_maps_centres() -> None:
    """Original pixels far outside the aligned square warp into the rim of the maps, past their outer
    pixel centres: they read the outer pixel's value (the ramp clamped to its first and last centre), not
    a blend toward zero that pulls every class logit to 0 there."""
    h, w, warp_size = 90, 70, 64
    c = (np.arange(32) + 0.5) * 2.0
    ramps = torch.from_numpy(np.stack(np.broadcast_arrays(c[None, :], c[:, None])).astype(np.float32))
    m = T.around((35.0, 45.0), 0.4, 3.0, (-73.0, -103.0))  # 3× zoom on the centre: most pixels warp far out
    back = T.tanh_warp_unwarp(ramps, m, 0.8, warp_size, (h, w)).numpy()
    ys, xs = np.mgrid[:h, :w] + 0.5
    centres = np.stack([xs, ys], axis=-1).reshape(-1, 2)
    expect = T.tanh_warp_forward(T.apply(m, centres), 0.8, warp_size).reshape(h, w, 2).transpose(2, 0, 1)
    assert ((expect < c[0]) | (expect > c[-1])).any(axis=0).mean() > 0.2
    np.testing.assert_allclose(back, np.clip(expect, c[0], c[-1]), atol=1e-3)


def test_photometric_switches() -> None:
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    off = T.Photometric(gray_p=0.0, gamma_p=0.0, blur_p=0.0)
    np.testing.assert_array_equal(T.photometric(img, off, rng), img)
    gray = T.photometric(img, T.Photometric(gray_p=1.0, gamma_p=0.0, blur_p=0.0), rng)
    luma = img.astype(float) @ [0.299, 0.587, 0.114]  # ITU-R BT.601, as OpenCV's RGB2GRAY
    assert (gray[..., 0] == gray[..., 2]).all() and np.abs(gray[..., 1] - luma).max() <= 1
    blurred = T.photometric(img, T.Photometric(gray_p=0.0, gamma_p=0.0, blur_p=1.0, blur_sigma=2.0), rng)
    assert blurred.std() < img.std()
    before = img.copy()
    occluded = T.occlude(img, rng, 0.5)
    black = (occluded == 0).all(-1)
    assert black.sum() >= 4
    np.testing.assert_array_equal(occluded[~black], img[~black])  # only the rectangle goes black
    np.testing.assert_array_equal(img, before)  # on a copy: the caller's (a cached) image stays as it was
    noisy = T.add_noise(img, rng, 10.0)
    assert noisy.dtype == np.uint8 and 5 < np.abs(noisy.astype(float) - img).mean() < 12


class _Draws:
    """A stand-in for the generator: ``uniform`` and ``integers`` give the values queued, in order."""

    def __init__(self, *values: float) -> None:
        self.values = list(values)

    def uniform(self, low: float = 0.0, high: float = 1.0, size: object = None) -> object:
        value = self.values.pop(0)
        return np.full(size, value) if size is not None else value

    def integers(self, low: int, high: int | None = None) -> int:
        """The value queued, which must lie in the range asked (``[0, low)`` when one bound is given)."""
        low, high = (0, low) if high is None else (low, high)
        value = int(self.values.pop(0))
        assert low <= value < high, f"queued {value} outside [{low}, {high})"
        return value

    def random(self) -> float:
        return self.values.pop(0)


def test_farl_kinds_of_gamma_blur_occlusion_and_noise() -> None:
    """FaRL's augmentations (params.paper.yaml), each by hand: a gamma picked from gamma_choices, a box
    blur of int(mean side × draw) pixels (none under 2), the clipped occlusion and the uniform-noise blend."""
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (40, 60, 3), dtype=np.uint8)
    square = T.Photometric(gray_p=0.0, gamma_p=1.0, gamma_choices=[0.5, 2.0], blur_p=0.0)
    lut = (255.0 * (np.arange(256) / 255.0) ** 2.0).round().astype(np.uint8)
    np.testing.assert_array_equal(T.photometric(img, square, _Draws(0.5, 0.0, 1, 0.5)), cv2.LUT(img, lut))
    box = T.Photometric(gray_p=0.0, gamma_p=0.0, blur_p=1.0, blur="box", blur_box=0.1)
    # mean side 50 × 0.09 = 4.5 -> a 4-pixel box; 50 × 0.03 = 1.5 -> 1 pixel, no blur
    np.testing.assert_array_equal(T.photometric(img, box, _Draws(0.5, 0.5, 0.0, 0.09)), cv2.blur(img, (4, 4)))
    np.testing.assert_array_equal(T.photometric(img, box, _Draws(0.5, 0.5, 0.0, 0.03)), img)
    # 50 × 0.05 = 2.5 -> 2 pixels, the smallest box that blurs
    np.testing.assert_array_equal(T.photometric(img, box, _Draws(0.5, 0.5, 0.0, 0.05)), cv2.blur(img, (2, 2)))
    # height 0.3 × 40 = 12 rows, width (0.3 + 0.1) × 60 = 24 columns, centred at (55, 4): cut at the edges
    out = T.occlude_clipped(img, _Draws(0.3, 0.1, 55.0, 4.0), 0.4)
    dark = np.zeros((40, 60), bool)
    dark[0:10, 43:60] = True
    np.testing.assert_array_equal(out[dark], 0)
    np.testing.assert_array_equal(out[~dark], img[~dark])
    mixed = T.blend_noise(img, _Draws(0.25, 255.0), 0.5)
    np.testing.assert_array_equal(mixed, np.rint(0.75 * img + 0.25 * 255.0).astype(np.uint8))


def test_a_drawn_gamma_raises_intensities_to_its_power() -> None:
    """Without gamma_choices the gamma is drawn from [gamma_min, gamma_max] and applied as (v/255)^gamma:
    a draw of 1.5 darkens 128 to 255 · (128/255)^1.5 = 90.7 -> 91 (its inverse, 1/1.5, would give 161)."""
    img = np.array([[[0, 128, 255]]], np.uint8)
    cfg = T.Photometric(gray_p=0.0, gamma_p=1.0, blur_p=0.0)
    np.testing.assert_array_equal(T.photometric(img, cfg, _Draws(0.5, 0.0, 1.5, 0.5)), [[[0, 91, 255]]])


def test_occlusion_is_the_drawn_rectangle_inside_the_image() -> None:
    """Sides drawn as shares of the image's own width and height, the corner within ``[0, w - bw]`` ×
    ``[0, h - bh]``: on a 60×40 (h × w) image, shares 0.25 give 10 columns and 15 rows, and the last
    corner allowed, (30, 45), blacks exactly the bottom-right 15×10 block. A square image could not tell
    the width from the height."""
    img = np.full((60, 40, 3), 200, np.uint8)
    out = T.occlude(img, _Draws(0.25, 0.25, 30, 45), 0.5)
    dark = np.zeros((60, 40), bool)
    dark[45:, 30:] = True
    np.testing.assert_array_equal((out == 0).all(-1), dark)


def test_photometric_params_are_checked() -> None:
    with pytest.raises(ParamsError, match="gamma_max"):
        build(T.Photometric, {"gamma_min": 2.0, "gamma_max": 1.0})
    with pytest.raises(ParamsError, match="gray_p"):
        build(T.Photometric, {"gray_p": 1.5})
    # the blur draws its sigma from 0.1 up to blur_sigma: below 0.1 it blurred more than the largest asked
    with pytest.raises(ParamsError, match="blur_sigma"):
        build(T.Photometric, {"blur_sigma": 0.05})
    with pytest.raises(ParamsError, match="gamma_choices: must all be > 0"):
        build(T.Photometric, {"gamma_choices": [0.5, 0.0]})
    with pytest.raises(ParamsError, match="blur"):
        build(T.Photometric, {"blur": "median"})


def test_to_tensor_normalises() -> None:
    img = np.full((4, 5, 3), 255, np.uint8)
    x = T.to_tensor(img)
    assert x.shape == (3, 4, 5) and x.dtype == torch.float32
    np.testing.assert_allclose(x[:, 0, 0].numpy(), (1 - T.IMAGENET_MEAN) / T.IMAGENET_STD, rtol=1e-6)
