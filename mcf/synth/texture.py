"""The face texture: colour and LaPa label of the head's front, painted in canonical (x, y).

Texel (i, j) holds canonical point (x = j / k - 1, y = i / k - head_h); label 255 marks texels outside
the face (transparent). Every region is filled once into the colour image (anti-aliased) and once into
the label image with the same polygon, so the projected labels match the projected pixels.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from mcf.synth.geometry import Eye, Shapes, inside_face
from mcf.synth.identity import Identity

TRANSPARENT = 255
SHIFT = 4  # fixed-point bits for sub-texel polygon vertices
_CIRCLE = np.stack([np.cos(np.linspace(0, 2 * np.pi, 24, endpoint=False)),
                    np.sin(np.linspace(0, 2 * np.pi, 24, endpoint=False))], 1)
_STREAK_X = np.linspace(-1.3, 1.3, 64)
# LaPa classes.
SKIN, LBROW, RBROW, LEYE, REYE, NOSE, ULIP, MOUTH, LLIP, HAIR = 1, 2, 3, 4, 5, 6, 7, 8, 9, 10


@dataclass(frozen=True, eq=False)
class Texture:
    colour: np.ndarray  # [H, W, 3] uint8 BGR
    label: np.ndarray  # [H, W] uint8, LaPa class or TRANSPARENT
    k: float  # texels per canonical unit
    head_h: float

    def coords(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Texel coordinates of canonical points (for cv2.remap)."""
        return ((x + 1.0) * self.k).astype(np.float32), ((y + self.head_h) * self.k).astype(np.float32)


def hair_streaks(rng: np.random.Generator) -> np.ndarray:
    """[64] brightness factors over x in -1.3..1.3: hair strands, shared by texture and hair volume."""
    v = rng.normal(0.0, 1.0, 64)
    v = np.convolve(v, np.ones(3) / 3, mode="same")
    return (1.0 + 0.12 * v).astype(np.float32)


def streak_at(streaks: np.ndarray, x: np.ndarray) -> np.ndarray:
    return np.interp(x, _STREAK_X, streaks).astype(np.float32)


class _Painter:
    """Fills canonical polygons into the colour and label images of a texture."""

    def __init__(self, tex: Texture) -> None:
        self.tex, self.scale = tex, float(tex.k * (1 << SHIFT))

    def pts(self, poly: np.ndarray) -> np.ndarray:
        off = np.array([1.0, self.tex.head_h])
        return np.round((poly + off) * self.scale).astype(np.int32)

    def fill(self, poly: np.ndarray, colour: np.ndarray, label: int | None = None) -> None:
        p = [self.pts(poly)]
        cv2.fillPoly(self.tex.colour, p, _c(colour), cv2.LINE_AA, SHIFT)
        if label is not None:
            cv2.fillPoly(self.tex.label, p, label, cv2.LINE_8, SHIFT)

    def line(self, poly: np.ndarray, colour: np.ndarray, width: float) -> None:
        thick = max(1, int(round(width * self.tex.k)))
        cv2.polylines(self.tex.colour, [self.pts(poly)], False, _c(colour), thick, cv2.LINE_AA, SHIFT)

    def ellipse(self, centre: np.ndarray, axes: tuple[float, float], colour: np.ndarray) -> None:
        self.fill(centre + _CIRCLE * axes, colour)


def _c(colour: np.ndarray) -> tuple[float, float, float]:
    return min(255.0, max(0.0, float(colour[0]))), min(255.0, max(0.0, float(colour[1]))), \
        min(255.0, max(0.0, float(colour[2])))


def _paint_eye(p: _Painter, eye: Eye, label: int, ident: Identity, rng: np.random.Generator) -> None:
    skin = np.array(ident.skin)
    p.fill(eye.ring, np.full(3, rng.uniform(215, 245)) - np.array([0, 5, 10]) * rng.random(), label)
    lift = 0.7 * (eye.ring[7, 1] - (eye.ring[0, 1] + eye.ring[14, 1]) / 2)
    p.line(eye.ring[:15] + [0.0, lift], skin * 0.82, 0.012)  # lid crease
    tex = p.tex
    r = eye.iris_r
    lo = np.floor((eye.pupil - r + [1.0, tex.head_h]) * tex.k).astype(int) - 1
    hi = np.ceil((eye.pupil + r + [1.0, tex.head_h]) * tex.k).astype(int) + 2
    lo, hi = np.maximum(lo, 0), np.minimum(hi, [tex.label.shape[1], tex.label.shape[0]])
    box = (slice(lo[1], hi[1]), slice(lo[0], hi[0]))
    saved = tex.colour[box].copy()
    p.ellipse(eye.pupil, (r, r), np.array(ident.iris))
    p.ellipse(eye.pupil, (0.42 * r, 0.42 * r), np.full(3, 18.0))
    p.ellipse(eye.pupil + [0.3 * r, -0.3 * r], (0.18 * r, 0.18 * r), np.full(3, 240.0))
    outside = tex.label[box] != label  # the iris is clipped by the lids
    tex.colour[box][outside] = saved[outside]
    p.line(eye.ring[:15], np.array(ident.brow) * 0.6, 0.022)  # upper lid and lashes


def _paint_mouth(p: _Painter, s: Shapes, ident: Identity) -> None:
    lips = np.array(ident.lips)
    p.fill(s.upper_lip, lips * 0.9, ULIP)
    p.fill(s.lower_lip, lips, LLIP)
    if s.inner_mouth is not None:
        p.fill(s.inner_mouth, np.array([28.0, 22, 75]), MOUTH)
        if s.teeth is not None:
            p.fill(s.teeth, np.array([222.0, 230, 236]))
    else:
        p.line(s.lip_line, lips * 0.45, 0.012)


def paint_texture(ident: Identity, s: Shapes, scale: float, streaks: np.ndarray,
                  rng: np.random.Generator) -> Texture:
    """Paint the face's front for rendering at ``scale`` pixels per canonical unit."""
    k = float(np.clip(round(1.5 * scale), 16, 256))
    h, w = int(2 * ident.head_h * k) + 2, int(2 * k) + 2
    ys = (np.arange(h, dtype=np.float32) / k - ident.head_h)[:, None]
    xs = (np.arange(w, dtype=np.float32) / k - 1.0)[None, :]
    skin = np.array(ident.skin)
    colour = np.empty((h, w, 3), np.uint8)
    colour[:] = np.round(np.clip(skin, 0, 255)).astype(np.uint8)
    label = np.where(inside_face(ident, xs, ys), SKIN, TRANSPARENT).astype(np.uint8)
    hair = ys < ident.hairline_at(xs)
    hair_px = np.clip(np.array(ident.hair, np.float32) * streak_at(streaks, xs[0])[:, None], 0, 255)
    colour = np.where(hair[..., None], hair_px[None].astype(np.uint8), colour)
    label[hair & (label == SKIN)] = HAIR
    tex = Texture(np.ascontiguousarray(colour), label, k, ident.head_h)
    p = _Painter(tex)
    for poly, lab in zip(s.brows, (LBROW, RBROW), strict=True):
        p.fill(poly, np.array(ident.brow), lab)
    for eye, lab in zip(s.eyes, (LEYE, REYE), strict=True):
        _paint_eye(p, eye, lab, ident, rng)
    p.fill(s.nose, skin * 0.96, NOSE)
    for side in s.nose_sides:
        p.line(side, skin * 0.84, 0.03)
    tip = s.lm19[13]
    p.ellipse(tip + [0.0, -0.02], (0.5 * ident.nose_w, 0.04), np.minimum(skin * 1.07, 255))
    for c in s.nostrils:
        p.ellipse(c, (0.28 * ident.nose_w, 0.22 * ident.nose_b), skin * 0.42)
    _paint_mouth(p, s, ident)
    return tex
