"""Everything around a SynthFace face: cluttered backgrounds, occluders and camera effects."""

from __future__ import annotations

import cv2
import numpy as np

from mcf.synth.texture import SHIFT

OCCLUDERS = ("sunglasses", "hand", "block", "mask")


def _poly(img: np.ndarray, pts: np.ndarray, colour: np.ndarray) -> None:
    c = np.clip(colour, 0, 255)
    p = [np.round(pts * (1 << SHIFT)).astype(np.int32)]
    cv2.fillPoly(img, p, (float(c[0]), float(c[1]), float(c[2])), cv2.LINE_AA, SHIFT)


def _ellipse(centre: np.ndarray, axes: tuple[float, float], angle: float, n: int = 32) -> np.ndarray:
    a = np.linspace(0.0, 2 * np.pi, n, endpoint=False)
    pts = np.stack([axes[0] * np.cos(a), axes[1] * np.sin(a)], 1)
    c, s = np.cos(angle), np.sin(angle)
    return pts @ np.array([[c, s], [-s, c]]) + centre


def background(rng: np.random.Generator, h: int, w: int, difficulty: float) -> np.ndarray:
    """[h, w, 3] uint8: a gradient, smooth noise or wave pattern, then random shapes."""
    kind = int(rng.integers(3))
    c0, c1 = rng.uniform(0, 255, (2, 3)).astype(np.float32)
    xx = np.linspace(0, 1, w, dtype=np.float32)[None, :]
    yy = np.linspace(0, 1, h, dtype=np.float32)[:, None]
    if kind == 0:
        a = rng.uniform(0, 2 * np.pi)
        t = xx * np.cos(a) + yy * np.sin(a)
        t = (t - t.min()) / (np.ptp(t) + 1e-6)
    elif kind == 1:
        g = int(rng.integers(2, 9))
        t = cv2.resize(rng.random((g, g), dtype=np.float32), (w, h), interpolation=cv2.INTER_CUBIC)
    else:
        f = rng.uniform(3, 25, 2)
        t = 0.5 + 0.5 * np.sin(2 * np.pi * (f[0] * xx + f[1] * yy) + rng.uniform(0, 6.3))
    img = (c0 + np.clip(t, 0, 1)[..., None] * (c1 - c0)).astype(np.uint8)  # c0, c1 in 0..255
    side = min(h, w)
    for _ in range(int(rng.integers(2, 5 + int(14 * difficulty)))):
        colour = rng.uniform(0, 255, 3)
        centre = rng.uniform(0, 1, 2) * (w, h)
        r = side * rng.uniform(0.03, 0.3, 2)
        shape = int(rng.integers(3))
        if shape == 0:
            _poly(img, _ellipse(centre, (r[0], r[1]), rng.uniform(0, np.pi)), colour)
        elif shape == 1:
            _poly(img, _ellipse(centre, (r[0], r[1]), rng.uniform(0, np.pi), n=4), colour)
        else:
            _poly(img, centre + rng.uniform(-1, 1, (3, 2)) * r, colour)
    return img


def _occluder_polys(kind: str, lm19: np.ndarray, lm106: np.ndarray, box: np.ndarray,
                    rng: np.random.Generator) -> list[tuple[np.ndarray, np.ndarray]]:
    """(polygon, BGR colour) pairs of one occluder over the face in ``box``."""
    w, h = box[2:] - box[:2]
    if kind == "sunglasses":
        colour = rng.uniform(0, 70, 3)
        left, right = lm19[7], lm19[10]
        ang = float(np.arctan2(*(right - left)[::-1]))
        axes = (0.17 * w * rng.uniform(1.0, 1.3), 0.11 * h * rng.uniform(1.0, 1.4))
        normal = np.array([-np.sin(ang), np.cos(ang)]) * 0.02 * h
        bridge = np.array([left - normal, right - normal, right + normal, left + normal])
        return [(_ellipse(left, axes, ang), colour), (_ellipse(right, axes, ang), colour), (bridge, colour)]
    if kind == "hand":
        colour = np.array([170.0, 190, 225]) * rng.uniform(0.35, 1.05) + rng.normal(0, 8, 3)
        centre = box[:2] + rng.uniform(0.15, 0.85, 2) * (w, h)
        ang = rng.uniform(0, 2 * np.pi)
        palm = _ellipse(centre, (0.22 * w, 0.28 * h), ang)
        d = np.array([np.cos(ang), np.sin(ang)])
        fingers = [
            (_ellipse(centre + d * 0.38 * h + np.array([-d[1], d[0]]) * o * w, (0.05 * w, 0.2 * h),
                      ang + np.pi / 2), colour) for o in (-0.15, -0.05, 0.05, 0.15)
        ]
        return [(palm, colour), *fingers]
    if kind == "block":
        centre = box[:2] + rng.uniform(0.0, 1.0, 2) * (w, h)
        axes = (rng.uniform(0.12, 0.3) * w, rng.uniform(0.12, 0.3) * h)
        n = 4 if rng.random() < 0.5 else 32
        return [(_ellipse(centre, axes, rng.uniform(0, np.pi), n), rng.uniform(0, 255, 3))]
    colour = rng.uniform(150, 255, 3) if rng.random() < 0.7 else rng.uniform(0, 60, 3)
    return [(np.concatenate([lm106[3:30], lm106[[53]]]), colour)]  # a face mask: cheek-chin-cheek, nose


def draw_occluder(img: np.ndarray, lab: np.ndarray, occ: np.ndarray, lm19: np.ndarray, lm106: np.ndarray,
                  box: np.ndarray, rng: np.random.Generator) -> str:
    """Draw one random occluder; its pixels get label 0 (background, as in LaPa) and occ = 1."""
    kind = OCCLUDERS[int(rng.integers(len(OCCLUDERS)))]
    for pts, colour in _occluder_polys(kind, lm19, lm106, box, rng):
        _poly(img, pts, colour)
        p = [np.round(pts * (1 << SHIFT)).astype(np.int32)]
        cv2.fillPoly(lab, p, 0, cv2.LINE_8, SHIFT)
        cv2.fillPoly(occ, p, 1, cv2.LINE_8, SHIFT)
    return kind


def finish(img: np.ndarray, rng: np.random.Generator, difficulty: float) -> np.ndarray:
    """Camera effects on a copy: a lighting gradient with a colour cast, blur, then sensor noise
    (uniform and shared by the channels: cheaper to draw than Gaussian, alike after JPEG)."""
    h, w = img.shape[:2]
    a, g = rng.uniform(0, 2 * np.pi), rng.uniform(0, 0.15 + 0.35 * difficulty)
    ramp = 1 + g * (np.linspace(-1, 1, w, dtype=np.float32)[None, :] * np.cos(a)
                    + np.linspace(-1, 1, h, dtype=np.float32)[:, None] * np.sin(a))
    f = img.astype(np.float32) * (ramp[..., None] * rng.uniform(0.9, 1.1, 3).astype(np.float32))
    if rng.random() < 0.25 + 0.5 * difficulty:
        sigma = rng.uniform(0.3, 0.5 + 1.5 * difficulty) * w / 160
        f = cv2.GaussianBlur(f, (0, 0), sigma)
    amp = np.float32(rng.uniform(0, 2 + 10 * difficulty) * np.sqrt(12))  # uniform noise of that std
    f += (rng.random((h, w, 1), dtype=np.float32) - np.float32(0.5)) * amp + np.float32(0.5)
    return np.clip(f, 0, 255, out=f).astype(np.uint8)
