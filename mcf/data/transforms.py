"""Geometry and augmentations shared by the AFLW-19 and LaPa datasets.

Coordinate convention, everywhere in this package: continuous pixel coordinates with pixel ``j``
covering ``[j, j+1)`` (its centre at ``j + 0.5``). A crop of ``S`` pixels spans ``[0, S]``, so
normalised crop coordinates are ``px / S`` and an affine matrix maps a box exactly onto a crop. OpenCV
puts pixel centres at integers; :func:`cv_matrix` converts at the one place images are resampled.

The tanh warp (:func:`tanh_warp_forward` / :func:`tanh_warp_inverse`) is FaRL's, per axis: with
``u`` a coordinate's offset from the centre of the aligned square in half sides, the central band
``|u| <= 1 - w`` stays linear and the rest is compressed by ``tanh``:
``v = sign(u) * (1 - w + w * tanh((|u| - 1 + w) / w))``, ``w`` the warp factor (0.8 for LaPa). The
aligned square (the face ROI given by the template) lands within ``|v| <= 1 - w + w tanh(1)`` (0.81 of
the warped half side at 0.8) and the whole plane within ``|v| < 1``, so the rim of the warped square
shows ever more distant context; ``w -> 0`` is a plain crop. The inverse replaces ``tanh`` by
``atanh`` and is exact (to 1e-6 px in float64 out to about 7 half sides from the centre, where tanh
saturates). PROTOCOL.md calls this step a "tanh-polar warp"; FaRL's code, which produced the LaPa
numbers we compare with, warps each axis like this, so this is the warp we run.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from mcf.params import ParamsError, param

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)
_TANH_MAX = 1.0 - 1e-12  # atanh stays finite: the warped rim maps far outside any image


def to_tensor(rgb: np.ndarray) -> torch.Tensor:
    """``[H, W, 3]`` uint8 RGB to a float32 ``[3, H, W]`` ImageNet-normalised tensor."""
    x = (rgb.astype(np.float32) / 255.0 - IMAGENET_MEAN) / IMAGENET_STD
    return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))


# ---------------------------------------------------------------- affine geometry


def homogeneous(m: np.ndarray) -> np.ndarray:
    """``[2, 3]`` affine matrix to ``[3, 3]``."""
    return np.vstack([np.asarray(m, dtype=np.float64), [0.0, 0.0, 1.0]])


def compose(*ms: np.ndarray) -> np.ndarray:
    """``compose(a, b)`` applies ``b`` first, then ``a`` (matrix product order); returns ``[2, 3]``."""
    out = np.eye(3)
    for m in ms:
        out = out @ homogeneous(m)
    return out[:2]


def invert(m: np.ndarray) -> np.ndarray:
    """The exact inverse of a ``[2, 3]`` affine matrix."""
    return np.linalg.inv(homogeneous(m))[:2]


def apply(m: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Apply a ``[2, 3]`` (or batched ``[B, 2, 3]``) affine matrix to points ``[..., K, 2]``."""
    m = np.asarray(m, dtype=np.float64)
    p = np.asarray(points, dtype=np.float64)
    return p @ np.swapaxes(m[..., :2], -1, -2) + m[..., None, :, 2]


def box_matrix(box: np.ndarray, size: int) -> np.ndarray:
    """Map the box ``(left, right, top, bottom)`` exactly onto ``[0, size]²`` (x, y scaled apart)."""
    left, right, top, bottom = (float(v) for v in box)
    if not (right > left and bottom > top):
        raise ValueError(f"degenerate box (left, right, top, bottom) = {tuple(box)}")
    sx, sy = size / (right - left), size / (bottom - top)
    return np.array([[sx, 0.0, -left * sx], [0.0, sy, -top * sy]])


def similarity(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Least-squares similarity (rotation, uniform scale, shift; no reflection) taking src onto dst.

    Umeyama's closed form, so the fit is exact for a rotated, scaled and shifted template.
    """
    src, dst = np.asarray(src, np.float64), np.asarray(dst, np.float64)
    mu_s, mu_d = src.mean(0), dst.mean(0)
    s, d = src - mu_s, dst - mu_d
    var = (s**2).sum() / len(src)
    if var <= 0:
        raise ValueError("similarity: the source points coincide")
    u, sig, vt = np.linalg.svd(d.T @ s / len(src))
    fix = np.diag([1.0, np.sign(np.linalg.det(u) * np.linalg.det(vt)) or 1.0])
    rot = u @ fix @ vt
    scale = float(np.trace(np.diag(sig) @ fix)) / var
    return np.hstack([scale * rot, (mu_d - scale * rot @ mu_s)[:, None]])


def around(center: tuple[float, float], angle: float, scale: float, shift: tuple[float, float]) -> np.ndarray:
    """Rotate by ``angle`` (radians) and scale about ``center``, then shift by ``shift`` pixels."""
    c, s = np.cos(angle) * scale, np.sin(angle) * scale
    cx, cy = center
    return np.array(
        [[c, -s, cx + shift[0] - c * cx + s * cy], [s, c, cy + shift[1] - s * cx - c * cy]]
    )


def cv_matrix(m: np.ndarray) -> np.ndarray:
    """The same map for OpenCV, whose pixel centres sit at integers instead of at ``j + 0.5``."""
    m = np.asarray(m, dtype=np.float64)
    return np.hstack([m[:, :2], (m[:, 2] + m[:, :2] @ [0.5, 0.5] - 0.5)[:, None]])


def warp_affine(image: np.ndarray, m: np.ndarray, size: int, *, nearest: bool = False) -> np.ndarray:
    """Resample ``image`` onto a ``size``² canvas through ``m`` (source → canvas), zeros outside."""
    flags = cv2.INTER_NEAREST if nearest else cv2.INTER_LINEAR
    return cv2.warpAffine(image, cv_matrix(m), (size, size), flags=flags, borderMode=cv2.BORDER_CONSTANT)


def resize_square(image: np.ndarray, size: int) -> np.ndarray:
    """A square image at ``size``² (area averaging when shrinking); unchanged when already that size."""
    if image.shape[0] == size:
        return image
    interp = cv2.INTER_AREA if size < image.shape[0] else cv2.INTER_LINEAR
    return cv2.resize(image, (size, size), interpolation=interp)


# ---------------------------------------------------------------- tanh warp


def _tanh_axis(c: np.ndarray, warp_factor: float, half: float, *, inverse: bool) -> np.ndarray:
    """The warp (or its inverse) of one axis's float64 pixel coordinates ``c`` (size ``2 * half``)."""
    u = (np.asarray(c, np.float64) - half) / half
    linear = 1.0 - warp_factor
    beyond = np.maximum(np.abs(u) - linear, 0.0) / warp_factor
    if inverse:
        bent = np.arctanh(np.minimum(beyond, _TANH_MAX))
    else:
        bent = np.tanh(beyond)
    out = np.where(np.abs(u) > linear, np.sign(u) * (linear + warp_factor * bent), u)
    return half + out * half


def _tanh_warp(
    x: np.ndarray, y: np.ndarray, warp_factor: float, size: float, *, inverse: bool
) -> tuple[np.ndarray, np.ndarray]:
    """The warp (or its inverse) on coordinate arrays ``x``, ``y``: each axis on its own."""
    half = size / 2.0
    return (_tanh_axis(x, warp_factor, half, inverse=inverse),
            _tanh_axis(y, warp_factor, half, inverse=inverse))


def _warp_points(points: np.ndarray, warp_factor: float, size: float, inverse: bool) -> np.ndarray:
    p = np.asarray(points, np.float64)
    return np.stack(_tanh_warp(p[..., 0], p[..., 1], warp_factor, size, inverse=inverse), axis=-1)


def tanh_warp_forward(points: np.ndarray, warp_factor: float, size: float) -> np.ndarray:
    """Aligned-square points ``[..., 2]`` to warped-square points (both squares ``size`` px)."""
    return _warp_points(points, warp_factor, size, inverse=False)


def tanh_warp_inverse(points: np.ndarray, warp_factor: float, size: float) -> np.ndarray:
    """Warped-square points to aligned-square points: the exact inverse of the forward warp."""
    return _warp_points(points, warp_factor, size, inverse=True)


def tanh_warp_maps(
    matrix: np.ndarray, warp_factor: float, warp_size: int, out_size: int
) -> tuple[np.ndarray, np.ndarray]:
    """``cv2.remap`` maps for an ``out_size``² output: warped pixel centres → original pixels, through
    the inverse warp and the inverse of ``matrix`` (original → aligned ``warp_size``²).

    The warped frame is ``warp_size`` px; ``out_size`` only samples it more or less densely.
    """
    c = (np.arange(out_size, dtype=np.float64) + 0.5) * (warp_size / out_size)
    ax, ay = _tanh_warp(c[None, :], c[:, None], warp_factor, warp_size, inverse=True)  # [S, S] aligned
    inv = invert(matrix)
    maps = [inv[i, 0] * ax + inv[i, 1] * ay + (inv[i, 2] - 0.5) for i in (0, 1)]  # OpenCV centres
    return tuple(np.clip(v, -1e5, 1e5).astype(np.float32) for v in maps)  # type: ignore[return-value]


def remap(image: np.ndarray, maps: tuple[np.ndarray, np.ndarray], *, nearest: bool = False) -> np.ndarray:
    """Resample ``image`` through :func:`tanh_warp_maps`, zeros where the source is outside."""
    flags = cv2.INTER_NEAREST if nearest else cv2.INTER_LINEAR
    return cv2.remap(image, maps[0], maps[1], flags, borderMode=cv2.BORDER_CONSTANT)


def tanh_warp_warp(
    image: np.ndarray, matrix: np.ndarray, warp_factor: float, warp_size: int, out_size: int,
    *, nearest: bool = False,
) -> np.ndarray:
    """Warp an original image to ``out_size``² (matrix, then tanh warp) with one ``cv2.remap``."""
    return remap(image, tanh_warp_maps(matrix, warp_factor, warp_size, out_size), nearest=nearest)


def tanh_warp_unwarp(
    maps: torch.Tensor, matrix: np.ndarray, warp_factor: float, warp_size: int, orig_size: tuple[int, int]
) -> torch.Tensor:
    """Resample warped maps ``[C, S, S]`` (logits, probabilities; any S) onto the original ``[C, H, W]``.

    Every original pixel centre is sent forward (matrix, then warp) and the maps are read there
    bilinearly, so no inverse is approximated. The sampling runs on the device of ``maps``.
    """
    h, w = orig_size
    x, y = np.arange(w, dtype=np.float64)[None, :] + 0.5, np.arange(h, dtype=np.float64)[:, None] + 0.5
    m = np.asarray(matrix, np.float64)
    wx, wy = _tanh_warp(m[0, 0] * x + m[0, 1] * y + m[0, 2], m[1, 0] * x + m[1, 1] * y + m[1, 2],
                    warp_factor, warp_size, inverse=False)
    g = np.stack([wx, wy], axis=-1) * (2.0 / warp_size) - 1.0  # grid_sample's [-1, 1] pixel edges
    grid = torch.from_numpy(g.astype(np.float32)).to(maps.device)
    out = F.grid_sample(
        maps[None].float(), grid[None], mode="bilinear", padding_mode="border", align_corners=False
    )
    return out[0].to(maps.dtype)


# ---------------------------------------------------------------- augmentations


@dataclasses.dataclass(frozen=True)
class Photometric:
    """Colour augmentations shared by both tasks; a probability of 0 turns one off.

    The defaults are ours; FaRL's (its ``RandomGray``, ``RandomGamma``, ``RandomBlur``) are gray_p 0.1,
    gamma_p 1 with gamma_choices [0.5, 1, 2] (its square root, none, square) and blur_p 1 with a box
    blur of 0.01 (params.paper.yaml).
    """

    gray_p: float = param(0.2, ge=0.0, le=1.0)
    gamma_p: float = param(0.3, ge=0.0, le=1.0)
    gamma_min: float = param(0.7, gt=0.0)
    gamma_max: float = param(1.5, gt=0.0)
    gamma_choices: list[float] = param([])  # when given, the gamma is one of these (equally likely)
    blur_p: float = param(0.2, ge=0.0, le=1.0)
    blur: Literal["gaussian", "box"] = "gaussian"
    # gaussian: the largest sigma, in pixels of the crop blurred (FaRL: 512²); each blur draws it from 0.1
    blur_sigma: float = param(1.5, ge=0.1)
    # box: the kernel's largest side as a share of the image's mean side (each draws [0, this); under 2
    # pixels, no blur)
    blur_box: float = param(0.01, gt=0.0, le=1.0)

    def __post_init__(self) -> None:
        if self.gamma_max < self.gamma_min:
            raise ParamsError("gamma_max", f"must be >= gamma_min ({self.gamma_min}), got {self.gamma_max}")
        if any(g <= 0 for g in self.gamma_choices):
            raise ParamsError("gamma_choices", f"must all be > 0, got {self.gamma_choices}")


def photometric(image: np.ndarray, cfg: Photometric, rng: np.random.Generator) -> np.ndarray:
    """Gray, gamma and blur on a uint8 RGB image; geometry is untouched."""
    img = image
    if rng.random() < cfg.gray_p:
        img = np.repeat(cv2.cvtColor(img, cv2.COLOR_RGB2GRAY)[..., None], 3, axis=2)
    if rng.random() < cfg.gamma_p:
        if cfg.gamma_choices:
            gamma = cfg.gamma_choices[int(rng.integers(len(cfg.gamma_choices)))]
        else:
            gamma = rng.uniform(cfg.gamma_min, cfg.gamma_max)
        img = cv2.LUT(img, (255.0 * (np.arange(256) / 255.0) ** gamma).round().astype(np.uint8))
    if rng.random() < cfg.blur_p:
        if cfg.blur == "box":
            side = int((img.shape[0] + img.shape[1]) / 2 * rng.uniform(0.0, cfg.blur_box))
            img = cv2.blur(img, (side, side)) if side > 1 else img
        else:
            img = cv2.GaussianBlur(img, (0, 0), rng.uniform(0.1, cfg.blur_sigma))
    return img


def occlude(image: np.ndarray, rng: np.random.Generator, max_side: float) -> np.ndarray:
    """A black rectangle at a random place, each side 5%..``max_side`` of the image's."""
    h, w = image.shape[:2]
    bw, bh = (max(1, int(rng.uniform(0.05, max_side) * n)) for n in (w, h))
    x0, y0 = int(rng.integers(0, w - bw + 1)), int(rng.integers(0, h - bh + 1))
    out = image.copy()
    out[y0 : y0 + bh, x0 : x0 + bw] = 0
    return out


def occlude_clipped(image: np.ndarray, rng: np.random.Generator, max_side: float) -> np.ndarray:
    """FaRL's occlusion: a black rectangle centred anywhere in the image and cut at its edges; its height
    10%..``max_side`` of the image's, its width that share ± 10% of the image's width."""
    h, w = image.shape[:2]
    share_h = rng.uniform(0.1, max_side)
    share_w = share_h + rng.uniform(-0.1, 0.1)
    cx, cy = rng.uniform(0, w), rng.uniform(0, h)
    half_w, half_h = max(share_w, 0.0) * w / 2, share_h * h / 2
    x0, x1 = (int(np.clip(round(v), 0, w)) for v in (cx - half_w, cx + half_w))
    y0, y1 = (int(np.clip(round(v), 0, h)) for v in (cy - half_h, cy + half_h))
    out = image.copy()
    out[y0:y1, x0:x1] = 0
    return out


def blend_noise(image: np.ndarray, rng: np.random.Generator, max_alpha: float) -> np.ndarray:
    """FaRL's noise: the image mixed with uniform noise, ``(1 - a) * image + a * U(0, 255)`` per pixel and
    channel, the weight ``a`` drawn from [0, ``max_alpha``)."""
    alpha = rng.uniform(0.0, max_alpha)
    mixed = (1 - alpha) * image + alpha * rng.uniform(0.0, 255.0, image.shape)
    return np.clip(np.rint(mixed), 0, 255).astype(np.uint8)


def add_noise(image: np.ndarray, rng: np.random.Generator, std: float) -> np.ndarray:
    """Additive Gaussian noise of ``std`` intensity levels (0..255 scale)."""
    return np.clip(image + rng.normal(0.0, std, image.shape), 0, 255).astype(np.uint8)
