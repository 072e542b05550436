"""SynthFace identities: the constants of one synthetic person, sampled once from (seed, identity id).

Canonical face units: the head is an ellipsoid of half-width 1 (x, image-right), half-height ``head_h``
(y, down) and half-depth ``depth`` (z, towards the viewer), centred at the origin. Face features are
drawn in the frontal (x, y) plane and wrapped onto the ellipsoid's front. Colours are BGR (OpenCV order)
floats in 0..255.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

# Random-stream kinds: every random draw comes from default_rng([seed, kind, index]).
KIND_IDENTITY, KIND_CORPUS, KIND_AFLW, KIND_LAPA, KIND_SPLIT = 0, 1, 2, 3, 4

HAIR_STYLES = ("bald", "short", "long", "fringe")
_STYLE_P = (0.1, 0.35, 0.3, 0.25)
Colour = tuple[float, float, float]

# RGB anchors, converted to BGR on use.
_SKIN = np.array([[246, 222, 205], [226, 185, 155], [192, 140, 105], [141, 94, 64], [88, 58, 42]], float)
_HAIR = np.array(
    [[24, 20, 20], [58, 40, 30], [105, 70, 45], [150, 80, 40], [205, 170, 110], [165, 162, 158],
     [228, 224, 215]], float,
)
_HAIR_P = np.array([0.3, 0.25, 0.15, 0.08, 0.1, 0.07, 0.05])
_IRIS = np.array(
    [[90, 55, 30], [48, 30, 20], [120, 100, 50], [80, 120, 70], [70, 110, 165], [115, 125, 135]], float
)


@dataclass(frozen=True)
class Identity:
    """Shape and colour constants of one synthetic person (canonical units, see the module docstring)."""

    id: int
    head_h: float  # ellipsoid half-height
    depth: float  # ellipsoid half-depth
    jaw_y: float  # the jaw curve starts below this y
    chin_y: float  # lowest point of the face outline
    jaw_n: float  # superellipse exponent of the jaw (larger: squarer)
    skin: Colour
    eye_x: float  # eye centres at (±eye_x, eye_y)
    eye_y: float
    eye_w: float  # eye half-width
    eye_h: float  # upper-lid height / eye half-width
    eye_tilt: float  # radians, outer corners up
    iris_r: float  # iris radius / eye half-width
    iris: Colour
    brow_dx: float  # brow centre x offset from the eye centre (outwards)
    brow_gap: float  # eye centre to brow centre line
    brow_len: float  # brow half-length
    brow_thick: float
    brow_arch: float
    brow: Colour
    nose_len: float  # eye line to nose tip
    nose_w: float  # half-width at the alae
    nose_b: float  # tip to the bottom of the nose
    mouth_dy: float  # nose tip to the lip line
    mouth_w: float  # mouth half-width
    lip_up: float  # upper-lip thickness
    lip_lo: float  # lower-lip thickness
    lips: Colour
    hair_style: str  # one of HAIR_STYLES
    hair: Colour
    hairline: float  # y of the hair edge at the forehead centre
    hair_curve: float  # hairline y change per x² (positive: lower at the temples)
    sideburn_y: float  # hair reaches down to here at the temples
    fringe_y: float  # lower edge of a fringe (style "fringe")
    hair_thick: float  # hair volume beyond the skull
    hair_len: float  # lower end of long hair (style "long")
    back_y: float  # hair covers the back of the head above this y

    def hairline_at(self, x: np.ndarray) -> np.ndarray:
        """y of the hair edge on the head's front at ``x``; hair lies above (smaller y). Vectorised."""
        if self.hair_style == "bald":
            return np.full(np.shape(x), -np.inf, np.float32)
        ax = np.abs(x)
        y = self.hairline + self.hair_curve * x * x
        if self.hair_style == "fringe":
            w = np.clip((0.78 - ax) / 0.18, 0.0, 1.0)
            y = w * (self.fringe_y + 0.025 * np.sin(31.0 * x)) + (1.0 - w) * y
        side = np.clip((ax - 0.8) / 0.12, 0.0, 1.0)
        return (y + side * (self.sideburn_y - y)).astype(np.float32)


def _colour(rgb: np.ndarray) -> Colour:
    bgr = np.clip(rgb[::-1], 0, 255)
    return float(bgr[0]), float(bgr[1]), float(bgr[2])


def _mix(anchors: np.ndarray, t: float) -> np.ndarray:
    """Piecewise-linear interpolation along a row of colour anchors, t in 0..1."""
    pos = t * (len(anchors) - 1)
    i = min(int(pos), len(anchors) - 2)
    return anchors[i] + (pos - i) * (anchors[i + 1] - anchors[i])


@lru_cache(maxsize=4096)
def sample_identity(seed: int, identity_id: int) -> Identity:
    """The identity ``identity_id`` of the pool of ``seed`` (always the same person for the same pair)."""
    if identity_id < 0:
        raise ValueError(f"identity_id must be >= 0, got {identity_id}")
    r = np.random.default_rng([seed, KIND_IDENTITY, identity_id])
    u = r.uniform
    skin = _mix(_SKIN, r.beta(1.3, 1.3)) + r.normal(0, 6, 3)
    hair = _HAIR[r.choice(len(_HAIR), p=_HAIR_P)] * u(0.85, 1.15) + r.normal(0, 6, 3)
    if r.random() < 0.04:  # dyed hair
        hair = r.uniform(30, 230, 3)
    style = HAIR_STYLES[r.choice(len(HAIR_STYLES), p=_STYLE_P)]
    head_h = u(1.25, 1.45)
    eye_y, eye_w = u(-0.16, -0.02), u(0.14, 0.19)
    brow_gap, brow_thick, brow_arch = u(0.2, 0.27), u(0.035, 0.08), u(0.02, 0.07)
    brow_top = eye_y - brow_gap - brow_arch - brow_thick
    nose_len = u(0.38, 0.48)
    chin_y = head_h * u(0.93, 0.97)
    mouth_dy = min(u(0.24, 0.34), chin_y - 0.45 - (eye_y + nose_len))
    brow = 0.5 * hair + 0.5 * skin * u(0.3, 0.5)
    if style == "bald":
        brow = skin * u(0.3, 0.5)
    lips = (skin * u(0.55, 0.75) + np.array([185.0, 70, 80]) * u(0.25, 0.45)) * u(0.8, 0.95)
    return Identity(
        id=identity_id, head_h=head_h, depth=u(0.85, 1.05), jaw_y=u(0.2, 0.45), chin_y=chin_y,
        jaw_n=u(1.7, 3.0), skin=_colour(skin),
        eye_x=u(0.35, 0.44), eye_y=eye_y, eye_w=eye_w, eye_h=u(0.44, 0.56), eye_tilt=u(-0.06, 0.12),
        iris_r=u(0.4, 0.5), iris=_colour(_IRIS[r.integers(len(_IRIS))] * u(0.85, 1.15)),
        brow_dx=u(-0.01, 0.05), brow_gap=brow_gap, brow_len=u(0.17, 0.23), brow_thick=brow_thick,
        brow_arch=brow_arch, brow=_colour(brow),
        nose_len=nose_len, nose_w=u(0.12, 0.18), nose_b=u(0.05, 0.08),
        mouth_dy=mouth_dy, mouth_w=u(0.24, 0.34), lip_up=u(0.04, 0.07), lip_lo=u(0.05, 0.09),
        lips=_colour(lips),
        hair_style=style, hair=_colour(hair), hairline=min(u(-0.9, -0.68), brow_top - 0.2),
        hair_curve=u(-0.15, 0.25), sideburn_y=u(-0.15, 0.1), fringe_y=brow_top - u(0.1, 0.18),
        hair_thick=u(0.04, 0.12), hair_len=u(1.5, 2.6),
        back_y={"bald": -9.0, "short": u(-0.05, 0.15), "long": 0.5, "fringe": u(0.15, 0.3)}[style],
    )
