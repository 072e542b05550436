"""Pose, projection and ray-cast rendering of a SynthFace head.

The head is an ellipsoid (face texture on its front half), wrapped in a slightly larger hair ellipsoid.
Each output pixel casts an orthographic ray; the first opaque surface it meets gives the pixel's colour
*and* its label, so occlusion, yaw foreshortening and the label map all come from one geometry.
Landmarks are the forward projections of the same canonical points. Camera frame: x right, y down,
z towards the viewer; pixel (i, j) has its centre at x = j, y = i.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from mcf.synth.identity import Identity
from mcf.synth.texture import HAIR, SHIFT, SKIN, TRANSPARENT, Texture, streak_at

BACK_OPAQUE_Y = 0.3  # the back of the skull ends here; below, rays pass on to the neck and background


@dataclass(frozen=True)
class Pose:
    """Where and how one head is drawn."""

    yaw: float  # radians, > 0 turns the face towards image-right
    pitch: float  # radians, > 0 tilts the face up
    roll: float  # radians, in-plane
    scale: float  # pixels per canonical unit
    cx: float  # pixel position of the head centre
    cy: float
    light: tuple[float, float, float]  # unit vector towards the light, camera frame
    ambient: float  # 0..1 share of unshaded light

    def rotation(self) -> np.ndarray:
        """[3, 3] head frame → camera frame."""
        c, s = np.cos(self.yaw), np.sin(self.yaw)
        ry = np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]])
        c, s = np.cos(self.pitch), np.sin(self.pitch)
        rx = np.array([[1, 0, 0], [0, c, -s], [0, s, c]])
        c, s = np.cos(self.roll), np.sin(self.roll)
        rz = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])
        return rz @ rx @ ry

    def moved(self, dx: float, dy: float) -> Pose:
        return Pose(self.yaw, self.pitch, self.roll, self.scale, self.cx + dx, self.cy + dy,
                    self.light, self.ambient)


def _to_pixels(pose: Pose, p: np.ndarray) -> np.ndarray:
    cam = p @ pose.rotation().T
    return cam[:, :2] * pose.scale + np.array([pose.cx, pose.cy])


def project_surface(ident: Identity, pose: Pose, pts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pixels [N, 2] of canonical points [N, 2] on the face, and whether each faces the camera [N]."""
    x, y = pts[:, 0], pts[:, 1]
    b, c = ident.head_h, ident.depth
    z = c * np.sqrt(np.clip(1.0 - x**2 - (y / b) ** 2, 0.0, None))
    normal = np.stack([x, y / b**2, z / c**2], 1) @ pose.rotation().T
    return _to_pixels(pose, np.stack([x, y, z], 1)), normal[:, 2] > 0


def _fill(img: np.ndarray, lab: np.ndarray, pix: np.ndarray, colour: np.ndarray, label: int) -> None:
    p = [np.round(pix * (1 << SHIFT)).astype(np.int32)]
    c = np.clip(colour, 0, 255)
    cv2.fillPoly(img, p, (float(c[0]), float(c[1]), float(c[2])), cv2.LINE_AA, SHIFT)
    cv2.fillPoly(lab, p, label, cv2.LINE_8, SHIFT)


def draw_body(img: np.ndarray, lab: np.ndarray, ident: Identity, pose: Pose,
              rng: np.random.Generator) -> None:
    """Shoulders, long hair and neck: flat layers behind the head (LaPa: neck and clothes are background)."""
    shoulders = np.array([[-0.45, 1.35], [-1.6, 1.75], [-2.3, 2.3], [-2.5, 6], [2.5, 6], [2.3, 2.3],
                          [1.6, 1.75], [0.45, 1.35]])
    _fill(img, lab, _to_pixels(pose, np.c_[shoulders, np.full(8, -0.3)]), rng.uniform(20, 235, 3), 0)
    if ident.hair_style == "long":
        a = np.linspace(2 * np.pi, np.pi, 12)
        arc = np.stack([1.1 * np.cos(a), 1.05 * ident.head_h * np.sin(a)], 1)
        bx = np.linspace(-1.25, 1.25, 9)
        bottom = np.stack([bx, ident.hair_len + 0.08 * np.sin(bx * 7 + ident.id)], 1)
        curtain = np.concatenate([[[-1.1, 0.0]], bottom, [[1.1, 0.0]], arc])
        _fill(img, lab, _to_pixels(pose, np.c_[curtain, np.full(len(curtain), -0.4)]),
              np.array(ident.hair) * 0.85, HAIR)
    neck = np.array([[-0.5, 0.5], [-0.52, 1.6], [0.52, 1.6], [0.5, 0.5]])
    _fill(img, lab, _to_pixels(pose, np.c_[neck, np.full(4, -0.25)]), np.array(ident.skin) * 0.78, 0)


Points = tuple[np.ndarray, np.ndarray, np.ndarray]  # x, y, z arrays [h, w], head frame


def _hits(rot: np.ndarray, axes: np.ndarray, xs: np.ndarray,
          ys: np.ndarray) -> tuple[Points, Points, np.ndarray]:
    """Near and far ray hits of an origin-centred ellipsoid with semi-axes ``axes``, and the hit mask."""
    r = rot.astype(np.float32)
    o = [xs * r[0, i] + ys * r[1, i] for i in range(3)]
    d = r[2]
    qa = float(((d / axes) ** 2).sum())
    qb = sum(o[i] * np.float32(2 * d[i] / axes[i] ** 2) for i in range(3))
    qc = sum((o[i] / np.float32(axes[i])) ** 2 for i in range(3)) - np.float32(1)
    disc = qb * qb - np.float32(4 * qa) * qc
    hit = disc > 0
    sq = np.sqrt(np.maximum(disc, 0))
    t_near, t_far = (sq - qb) / np.float32(2 * qa), (-sq - qb) / np.float32(2 * qa)
    near = tuple(o[i] + t_near * d[i] for i in range(3))
    far = tuple(o[i] + t_far * d[i] for i in range(3))
    return near, far, hit


def _shade(p: Points, axes: np.ndarray, light: np.ndarray, ambient: float, sign: float) -> np.ndarray:
    """[h, w, 1] Lambert shading of surface points (``sign`` -1 for a surface seen from inside)."""
    n = [p[i] / np.float32(axes[i] ** 2) for i in range(3)]
    norm = np.sqrt(n[0] * n[0] + n[1] * n[1] + n[2] * n[2]) + np.float32(1e-6)
    dot = (n[0] * light[0] + n[1] * light[1] + n[2] * light[2]) * np.float32(sign) / norm
    return (np.float32(ambient) + np.float32(1 - ambient) * np.clip(dot, 0, 1))[..., None]


def _head_layer(p: Points, hit: np.ndarray, ident: Identity, tex: Texture,
                hair: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Label [h, w] and colour [h, w, 3] of head-surface points: texture in front, skull behind."""
    mx, my = tex.coords(p[0], p[1])
    colour = cv2.remap(tex.colour, mx, my, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    label = cv2.remap(tex.label, mx, my, cv2.INTER_NEAREST, borderMode=cv2.BORDER_CONSTANT,
                      borderValue=TRANSPARENT)
    y, front = p[1], p[2] >= 0
    back_hair = y < ident.back_y
    back_label = np.where(y < BACK_OPAQUE_Y, np.where(back_hair, HAIR, SKIN), TRANSPARENT)
    label = np.where(hit, np.where(front, label, back_label), TRANSPARENT).astype(np.uint8)
    back_colour = np.where(back_hair[..., None], hair, np.array(ident.skin, np.float32))
    return label, np.where(front[..., None], colour.astype(np.float32), back_colour)


def _hair_layer(p: Points, hit: np.ndarray, ident: Identity) -> np.ndarray:
    """Label of the hair volume: hair above the hairline in front and above ``back_y`` behind."""
    edge = np.where(p[2] >= 0, ident.hairline_at(p[0]) - np.float32(0.03), np.float32(ident.back_y))
    return np.where(hit & (p[1] < edge), HAIR, TRANSPARENT).astype(np.uint8)


def head_roi(ident: Identity, pose: Pose, shape: tuple[int, ...]) -> tuple[slice, slice] | None:
    """The pixel rows and columns the head (with hair) can cover, clipped to the canvas."""
    rot = pose.rotation()
    axes = _hair_axes(ident)
    ext = pose.scale * np.sqrt(((rot[:2] * axes) ** 2).sum(1)) + 2
    x0, x1 = max(0, int(pose.cx - ext[0])), min(shape[1], int(pose.cx + ext[0]) + 1)
    y0, y1 = max(0, int(pose.cy - ext[1])), min(shape[0], int(pose.cy + ext[1]) + 1)
    return (slice(y0, y1), slice(x0, x1)) if x1 > x0 and y1 > y0 else None


def _hair_axes(ident: Identity) -> np.ndarray:
    t = 0.0 if ident.hair_style == "bald" else ident.hair_thick
    return np.array([1.0 + t, ident.head_h + t, ident.depth + t], np.float32)


def draw_head(img: np.ndarray, lab: np.ndarray, occ: np.ndarray, ident: Identity, tex: Texture,
              pose: Pose, streaks: np.ndarray) -> None:
    """Composite the head over ``img``/``lab`` in place; hair in front of the face is marked in ``occ``."""
    roi = head_roi(ident, pose, img.shape)
    if roi is None:
        return
    rot = pose.rotation()
    ys = ((np.arange(roi[0].start, roi[0].stop, dtype=np.float32) - pose.cy) / pose.scale)[:, None]
    xs = ((np.arange(roi[1].start, roi[1].stop, dtype=np.float32) - pose.cx) / pose.scale)[None, :]
    ys, xs = np.broadcast_arrays(ys, xs)
    light = (rot.T @ np.array(pose.light)).astype(np.float32)
    head_axes = np.array([1.0, ident.head_h, ident.depth], np.float32)
    near, far, hit = _hits(rot, head_axes, xs, ys)
    hair = np.array(ident.hair, np.float32) * streak_at(streaks, xs)[..., None]  # strands run along y
    layers = []  # back to front: hair far side, skull far side, skull near side, hair near side
    if ident.hair_style != "bald":
        hair_axes = _hair_axes(ident)
        h_near, h_far, h_hit = _hits(rot, hair_axes, xs, ys)
        far_shade = _shade(h_far, hair_axes, light, pose.ambient, -1)
        layers.append((_hair_layer(h_far, h_hit, ident), hair * far_shade))
    for p, sign in ((far, -1.0), (near, 1.0)):
        label, colour = _head_layer(p, hit, ident, tex, hair)
        layers.append((label, colour * _shade(p, head_axes, light, pose.ambient, sign)))
    if ident.hair_style != "bald":
        lab_n = _hair_layer(h_near, h_hit, ident)
        layers.append((lab_n, hair * _shade(h_near, hair_axes, light, pose.ambient, 1)))
        occ[roi] |= (lab_n != TRANSPARENT).astype(np.uint8)
    out_lab, out_col = lab[roi].copy(), img[roi].astype(np.float32)
    for label, colour in layers:
        m = label != TRANSPARENT
        out_lab[m] = label[m]
        out_col[m] = colour[m]
    lab[roi] = out_lab
    img[roi] = np.clip(out_col, 0, 255, out=out_col).astype(np.uint8)
