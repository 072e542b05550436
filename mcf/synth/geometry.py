"""SynthFace geometry: feature outlines and landmarks of one face, in canonical frontal coordinates.

The same arrays are painted into the face texture and projected as ground truth, so landmarks and
label regions agree by construction. "Left" always means image-left.

106-point layout (LaPa files; SynthFace's own, sampled on the drawn outlines):

- 0-32 face contour, image-left temple → chin (16) → image-right temple;
- 33-41 left brow, 42-50 right brow: 5 upper-edge points left→right, then 4 lower-edge points right→left;
- 51-54 nose bridge, top → tip (54 = nose tip); 55-59 nose base left→right (ala, nostril, subnasale, …);
- 60-67 left eye, 68-75 right eye: left corner, 3 upper lid, right corner, 3 lower lid (right→left);
- 76-79 left nose side, 80-83 right nose side (top → bottom);
- 84-95 outer lips: 84 left corner, 85-89 upper, 90 right corner, 91-95 lower (right→left);
- 96-103 inner lips: 96 left, 97-99 upper, 100 right, 101-103 lower (right→left);
- 104, 105 left and right eye centres (pupils).

AFLW-19 order: 0-2 left brow (left end, middle, right end), 3-5 right brow, 6-8 left eye (left corner,
centre, right corner), 9-11 right eye, 12-14 nose (left ala, tip, right ala), 15-17 mouth (left corner,
centre, right corner), 18 chin. Points 104/105/54/84/90 of the 106 equal AFLW 7/10/13/15/17 exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mcf.synth.identity import Identity

FIVE_FROM_19 = (7, 10, 13, 15, 17)  # eye centres, nose tip, mouth corners
# Curve parameters, built once: every face samples its outlines at the same points.
_T15, _T17, _U13 = np.linspace(-1.0, 1.0, 15), np.linspace(-1.0, 1.0, 17), np.linspace(-1.0, 1.0, 13)
_S10, _ARC = np.linspace(0.0, 1.0, 10), np.linspace(np.pi, 0.0, 13)[1:-1]


@dataclass(frozen=True)
class Expression:
    """Per-image face state."""

    mouth_open: float  # 0 closed .. 1 wide open
    smile: float  # corners up (> 0) or down (< 0)
    eye_open: float  # lid opening relative to the identity's
    brow_raise: float  # canonical units, up
    gaze: tuple[float, float]  # pupil offset, fractions of the eye size


def sample_expression(rng: np.random.Generator, difficulty: float) -> Expression:
    """A random expression; harder settings open the mouth more often and wider."""
    opened = rng.random() < 0.3 + 0.2 * difficulty
    return Expression(
        mouth_open=float(rng.uniform(0.15, 1.0)) if opened else 0.0,
        smile=float(rng.uniform(-0.3, 1.0)),
        eye_open=float(rng.uniform(0.75, 1.1)),
        brow_raise=float(rng.uniform(-0.02, 0.04)),
        gaze=(float(rng.uniform(-1, 1)), float(rng.uniform(-0.4, 0.4))),
    )


@dataclass(frozen=True, eq=False)
class Eye:
    ring: np.ndarray  # [28, 2] upper lid left→right (15), lower lid right→left (13)
    pupil: np.ndarray  # [2]
    iris_r: float


@dataclass(frozen=True, eq=False)
class Shapes:
    """Outlines ([K, 2] x, y arrays) and landmarks of one face, canonical units."""

    brows: tuple[np.ndarray, np.ndarray]  # closed polygons, left then right
    eyes: tuple[Eye, Eye]
    nose: np.ndarray
    nose_sides: tuple[np.ndarray, np.ndarray]  # shading lines
    nostrils: tuple[np.ndarray, np.ndarray]  # centres
    upper_lip: np.ndarray
    lower_lip: np.ndarray
    inner_mouth: np.ndarray | None  # None when the mouth is closed
    teeth: np.ndarray | None
    lip_line: np.ndarray  # where the lips meet
    lm19: np.ndarray  # [19, 2]
    lm106: np.ndarray  # [106, 2]
    forehead: np.ndarray  # [3, 2] top of the face box


def half_width(ident: Identity, y: np.ndarray) -> np.ndarray:
    """Half-width of the face outline (ellipse cut by the superellipse jaw) at height y."""
    hw = np.sqrt(np.clip(1.0 - (y / ident.head_h) ** 2, 0.0, None))
    xw = np.sqrt(1.0 - (ident.jaw_y / ident.head_h) ** 2)
    t = np.clip((y - ident.jaw_y) / (ident.chin_y - ident.jaw_y), 0.0, 1.0)
    jaw = xw * (1.0 - t**ident.jaw_n) ** (1.0 / ident.jaw_n)
    return np.where(y > ident.jaw_y, np.minimum(hw, jaw), hw)


def inside_face(ident: Identity, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Whether canonical (x, y) lies inside the face outline (broadcasts)."""
    return (np.abs(x) <= half_width(ident, y)) & (y <= ident.chin_y)


def _eye(ident: Identity, expr: Expression, sgn: int) -> Eye:
    t = _T15
    w = ident.eye_w
    hu = w * ident.eye_h * expr.eye_open
    upper = np.stack([t * w, -hu * (1 - t**2) ** 0.8], 1)
    lower = np.stack([t[::-1] * w, 0.6 * hu * (1 - t[::-1] ** 2) ** 0.9], 1)[1:-1]
    a = -sgn * ident.eye_tilt
    rot = np.array([[np.cos(a), np.sin(a)], [-np.sin(a), np.cos(a)]])
    centre = np.array([sgn * ident.eye_x, ident.eye_y])
    pupil = centre + np.array([expr.gaze[0] * 0.25 * w, expr.gaze[1] * 0.3 * hu])
    return Eye(np.concatenate([upper, lower]) @ rot + centre, pupil, ident.iris_r * w)


def _brow(ident: Identity, expr: Expression, sgn: int) -> tuple[np.ndarray, np.ndarray]:
    """(upper edge, lower edge), each [13, 2] left→right."""
    u = _U13  # -1 outer end, +1 inner end
    x = sgn * (ident.eye_x + ident.brow_dx) - sgn * u * ident.brow_len
    yc = ident.eye_y - ident.brow_gap - expr.brow_raise - ident.brow_arch * (1 - u**2) - 0.03 * u
    th = ident.brow_thick * (0.55 + 0.225 * (u + 1)) * np.clip(1 - u**2, 0.3, 1.0) ** 0.35
    upper, lower = np.stack([x, yc - th / 2], 1), np.stack([x, yc + th / 2], 1)
    return (upper[::-1], lower[::-1]) if sgn > 0 else (upper, lower)


def _nose(ident: Identity) -> tuple[np.ndarray, float, float, np.ndarray, np.ndarray]:
    """Outline, top y, tip y, side x and side y (top → alae)."""
    top, tip = ident.eye_y + 0.02, ident.eye_y + ident.nose_len
    s = _S10
    sy = top + (tip - top) * s
    sx = 0.055 + (ident.nose_w - 0.055) * s**2.5
    a = _ARC
    arc = np.stack([ident.nose_w * np.cos(a), tip + ident.nose_b * np.sin(a)], 1)
    outline = np.concatenate([np.stack([-sx, sy], 1), arc, np.stack([sx[::-1], sy[::-1]], 1)])
    return outline, top, tip, sx, sy


def _mouth(ident: Identity, expr: Expression) -> dict[str, np.ndarray]:
    """Lip curves over t = -1..1 (17 samples): x, meeting line, inner upper/lower, outer upper/lower."""
    my = ident.eye_y + ident.nose_len + ident.mouth_dy
    mw = ident.mouth_w * (1 + 0.1 * max(expr.smile, 0.0))
    t = _T17
    yc = my - 0.05 * expr.smile * t**2
    bump = (1 - t**2) ** 0.7
    o = 0.2 * expr.mouth_open
    yui, yli = yc - 0.25 * o * bump, yc + 0.75 * o * bump
    yuo = yui - ident.lip_up * np.sqrt(1 - t**2) * (1 - 0.3 * np.exp(-((t / 0.18) ** 2)))
    ylo = yli + ident.lip_lo * (1 - t**2) ** 0.6
    return {"x": t * mw, "yc": yc, "yui": yui, "yli": yli, "yuo": yuo, "ylo": ylo}


def _contour(ident: Identity, chin: np.ndarray) -> np.ndarray:
    """[33, 2] contour points just inside the outline, left temple → chin → right temple."""
    ys = np.linspace(ident.eye_y - 0.05, chin[1], 150)
    dense = np.concatenate([np.stack([-0.985 * half_width(ident, ys), ys], 1), chin[None]])
    seg = np.r_[0.0, np.cumsum(np.hypot(*np.diff(dense, axis=0).T))]
    at = np.linspace(0.0, seg[-1], 17)
    left = np.stack([np.interp(at, seg, dense[:, 0]), np.interp(at, seg, dense[:, 1])], 1)
    left[-1] = chin
    right = left[-2::-1] * np.array([-1.0, 1.0])
    return np.concatenate([left, right])


def face_shapes(ident: Identity, expr: Expression) -> Shapes:
    """Every outline and landmark of ``ident`` wearing ``expr``."""
    eyes = (_eye(ident, expr, -1), _eye(ident, expr, 1))
    brow_edges = (_brow(ident, expr, -1), _brow(ident, expr, 1))
    nose, top, tip, sx, sy = _nose(ident)
    m = _mouth(ident, expr)
    x = m["x"]
    pts = {k: np.stack([x, m[k]], 1) for k in ("yc", "yui", "yli", "yuo", "ylo")}
    opened = expr.mouth_open > 0.0
    inner = np.concatenate([pts["yui"], pts["yli"][-2:0:-1]]) if opened else None
    teeth = None
    if expr.mouth_open > 0.35:
        low = np.stack([x, m["yui"] + 0.35 * (m["yli"] - m["yui"])], 1)
        teeth = np.concatenate([pts["yui"][2:-2], low[2:-2][::-1]])
    nw, nb = ident.nose_w, ident.nose_b
    chin = np.array([0.0, ident.chin_y - 0.02])
    centre_of = [(u + lo) / 2 for u, lo in brow_edges]
    mouth_c = np.array([0.0, (m["yui"][8] + m["yli"][8]) / 2])
    lm19 = np.array(
        [*(c[j] for c in centre_of for j in (0, 6, 12)),
         eyes[0].ring[0], eyes[0].pupil, eyes[0].ring[14], eyes[1].ring[0], eyes[1].pupil, eyes[1].ring[14],
         [-0.85 * nw, tip + 0.2 * nb], [0.0, tip], [0.85 * nw, tip + 0.2 * nb],
         pts["yc"][0], mouth_c, pts["yc"][16], chin]
    )
    brows106 = [np.concatenate([u[[0, 3, 6, 9, 12]], lo[[10, 7, 5, 2]]]) for u, lo in brow_edges]
    eyes106 = [e.ring[[0, 4, 7, 10, 14, 18, 21, 24]] for e in eyes]
    bridge = np.stack([np.zeros(4), top + (tip - top) * np.array([0, 1 / 3, 2 / 3, 1])], 1)
    base = np.array([[-0.95 * nw, tip], [-0.45 * nw, tip + 0.75 * nb], [0.0, tip + 0.95 * nb],
                     [0.45 * nw, tip + 0.75 * nb], [0.95 * nw, tip]])
    k = np.array([3, 5, 7, 9])
    sides = [np.stack([-(sx[k] - 0.02), sy[k]], 1), np.stack([sx[k] - 0.02, sy[k]], 1)]
    inner_c = [np.array([x[i], (m["yui"][i] + m["yli"][i]) / 2]) for i in (1, 15)]
    lm106 = np.concatenate([
        _contour(ident, chin), *brows106, bridge, base, *eyes106, *sides,
        pts["yc"][[0]], pts["yuo"][[3, 5, 8, 11, 13]], pts["yc"][[16]], pts["ylo"][[13, 11, 8, 5, 3]],
        inner_c[0][None], pts["yui"][[4, 8, 12]], inner_c[1][None], pts["yli"][[12, 8, 4]],
        eyes[0].pupil[None], eyes[1].pupil[None],
    ])
    lm106[54] = lm19[13]  # the bridge's last point is the nose tip itself
    brow_y = min(lm19[:6, 1]) - 0.25
    return Shapes(
        brows=tuple(np.concatenate([u, lo[::-1]]) for u, lo in brow_edges),
        eyes=eyes, nose=nose,
        nose_sides=tuple(np.stack([s * (sx - 0.02), sy], 1)[:-2] for s in (-1, 1)),
        nostrils=(np.array([-0.45 * nw, tip + 0.5 * nb]), np.array([0.45 * nw, tip + 0.5 * nb])),
        upper_lip=np.concatenate([pts["yuo"], pts["yui"][-2:0:-1]]),
        lower_lip=np.concatenate([pts["yli"], pts["ylo"][-2:0:-1]]),
        inner_mouth=inner, teeth=teeth, lip_line=pts["yc"], lm19=lm19, lm106=lm106,
        forehead=np.array([[-0.5, brow_y], [0.0, brow_y], [0.5, brow_y]]),
    )
