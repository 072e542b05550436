"""SynthFace rendering: one face with full ground truth (``render_face``) or a multi-face scene.

Every random draw comes from the ``rng`` passed in, in a fixed order, so an image is a pure function of
its generator's seed: ``default_rng([seed, kind, index])`` regenerates any image alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mcf.synth.config import SynthConfig
from mcf.synth.geometry import FIVE_FROM_19, Shapes, face_shapes, sample_expression
from mcf.synth.head import Pose, draw_body, draw_head, project_surface
from mcf.synth.identity import Identity
from mcf.synth.scenery import background, draw_occluder, finish
from mcf.synth.texture import hair_streaks, paint_texture


@dataclass(frozen=True, eq=False)
class FaceSample:
    """One rendered face. Coordinates are pixels, 0-based, pixel (i, j) centred at x = j, y = i."""

    image: np.ndarray  # [S, S, 3] uint8 BGR (OpenCV order)
    labels: np.ndarray  # [S, S] uint8 LaPa classes 0..10, from the same geometry as the image
    landmarks19: np.ndarray  # [19, 2] float32 x, y in AFLW-19 order
    visible19: np.ndarray  # [19] uint8: 0 under an occluder or hair, or turned away from the camera
    landmarks106: np.ndarray  # [106, 2] float32, layout in mcf.synth.geometry
    landmarks5: np.ndarray  # [5, 2] float32: left eye, right eye, nose tip, left and right mouth corner
    box: np.ndarray  # [4] float32 x1, y1, x2, y2: brows' forehead line to chin, cheek to cheek
    identity: int
    jpeg_quality: int
    pose: tuple[float, float, float]  # yaw, pitch, roll in degrees


@dataclass(frozen=True, eq=False)
class Scene:
    """A corpus scene; per-face arrays are in drawing order."""

    image: np.ndarray  # [S, S, 3] uint8 BGR
    boxes: np.ndarray  # [F, 4] float32 x1, y1, x2, y2
    landmarks5: np.ndarray  # [F, 5, 2] float32
    identities: tuple[int, ...]
    jpeg_quality: int
    caption: str


@dataclass(frozen=True, eq=False)
class _Face:
    ident: Identity
    pose: Pose
    shapes: Shapes
    lm19: np.ndarray
    facing19: np.ndarray
    lm106: np.ndarray
    box: np.ndarray


def _sample_pose(rng: np.random.Generator, difficulty: float, scale: float) -> Pose:
    deg = np.radians
    yaw = rng.uniform(-1, 1) * deg(10 + 30 * difficulty)
    pitch = rng.uniform(-1, 1) * deg(6 + 14 * difficulty)
    roll = rng.uniform(-1, 1) * deg(8 + 22 * difficulty)
    light = np.array([rng.uniform(-0.9, 0.9), rng.uniform(-0.9, 0.6), 1.2])
    light /= np.linalg.norm(light)
    return Pose(float(yaw), float(pitch), float(roll), scale, 0.0, 0.0,
                (float(light[0]), float(light[1]), float(light[2])), float(rng.uniform(0.45, 0.75)))


def _place(rng: np.random.Generator, cfg: SynthConfig, ident: Identity, box_side: float) -> _Face:
    """A posed face whose box side is about ``box_side`` px, centred at the origin (move it after)."""
    shapes = face_shapes(ident, sample_expression(rng, cfg.difficulty))
    pose = _sample_pose(rng, cfg.difficulty, box_side / 2.1)
    pts = np.concatenate([shapes.lm19, shapes.lm106, shapes.forehead])
    pix, facing = project_surface(ident, pose, pts)
    box = np.concatenate([pix.min(0), pix.max(0)])
    return _Face(ident, pose, shapes, pix[:19], facing[:19], pix[19:125], box)


def _moved(face: _Face, dx: float, dy: float) -> _Face:
    d = np.array([dx, dy])
    return _Face(face.ident, face.pose.moved(dx, dy), face.shapes, face.lm19 + d, face.facing19,
                 face.lm106 + d, face.box + np.r_[d, d])


def _draw(img: np.ndarray, lab: np.ndarray, occ: np.ndarray, face: _Face, rng: np.random.Generator) -> None:
    streaks = hair_streaks(rng)
    tex = paint_texture(face.ident, face.shapes, face.pose.scale, streaks, rng)
    draw_body(img, lab, face.ident, face.pose, rng)
    draw_head(img, lab, occ, face.ident, tex, face.pose, streaks)


def _jpeg_quality(cfg: SynthConfig, rng: np.random.Generator) -> int:
    return int(rng.integers(cfg.jpeg_quality[0], cfg.jpeg_quality[1] + 1))


def render_face(cfg: SynthConfig, rng: np.random.Generator, identity: Identity, size: int) -> FaceSample:
    """One face of ``identity`` in a ``size``×``size`` image: the face box spans 40-62% of the side and
    every landmark lies at least 4% of the side inside the image."""
    if size < 32:
        raise ValueError(f"size must be >= 32 px, got {size}")
    face = _place(rng, cfg, identity, rng.uniform(0.4, 0.62) * size)
    margin = 0.04 * size
    lo, hi = margin - face.box[:2], size - margin - face.box[2:]
    face = _moved(face, rng.uniform(lo[0], max(lo[0], hi[0])), rng.uniform(lo[1], max(lo[1], hi[1])))
    img = background(rng, size, size, cfg.difficulty)
    lab = np.zeros((size, size), np.uint8)
    occ = np.zeros((size, size), np.uint8)
    _draw(img, lab, occ, face, rng)
    if rng.random() < 0.6 * cfg.difficulty:
        draw_occluder(img, lab, occ, face.lm19, face.lm106, face.box, rng)
    ij = np.clip(np.round(face.lm19).astype(int), 0, size - 1)
    visible = face.facing19 & (occ[ij[:, 1], ij[:, 0]] == 0)
    visible[18] = occ[ij[18, 1], ij[18, 0]] == 0  # the chin sits on the outline: only occluders hide it
    image = finish(img, rng, cfg.difficulty)
    f32 = np.float32
    return FaceSample(
        image=image, labels=lab, landmarks19=face.lm19.astype(f32), visible19=visible.astype(np.uint8),
        landmarks106=face.lm106.astype(f32), landmarks5=face.lm19[list(FIVE_FROM_19)].astype(f32),
        box=face.box.astype(f32), identity=identity.id, jpeg_quality=_jpeg_quality(cfg, rng),
        pose=tuple(float(np.degrees(a)) for a in (face.pose.yaw, face.pose.pitch, face.pose.roll)),
    )


def _halo(box: np.ndarray) -> np.ndarray:
    """Where this face's head and hair may reach: the box grown by 35% of its size, 60% upwards."""
    w, h = box[2:] - box[:2]
    return box + np.array([-0.35 * w, -0.6 * h, 0.35 * w, 0.35 * h])


def _overlaps(box: np.ndarray, others: list[np.ndarray]) -> bool:
    return any(box[0] < o[2] and o[0] < box[2] and box[1] < o[3] and o[1] < box[3] for o in others)


_COUNTS = ("two", "three", "four", "five", "six", "seven", "eight", "nine")


def _caption(faces: list[_Face]) -> str:
    n = len(faces)
    who = "a person" if n == 1 else f"{_COUNTS[n - 2] if n - 2 < len(_COUNTS) else n} people"
    hair = ", ".join(sorted({f.ident.hair_style for f in faces}))
    return f"a synthetic photo of {who} ({hair} hair)"


def render_scene(cfg: SynthConfig, rng: np.random.Generator, identities: list[Identity], size: int) -> Scene:
    """Up to ``len(identities)`` non-overlapping faces of varied size on a cluttered background.

    A face that finds no free spot in a few tries is left out (its identity too). Faces are drawn from
    the top down: a body only reaches below its chin, so it covers no face box drawn before it.
    """
    placed: list[_Face] = []
    largest = 0.7 / np.sqrt(len(identities))  # leave room for every face
    for ident in identities:
        face = _place(rng, cfg, ident, size * float(np.exp(rng.uniform(np.log(0.15), np.log(largest)))))
        free = size * 0.96 - (face.box[2:] - face.box[:2])
        for _ in range(12 if (free > 0).all() else 0):
            x, y = 0.02 * size + rng.uniform(0.0, free)
            moved = _moved(face, x - face.box[0], y - face.box[1])
            if not _overlaps(_halo(moved.box), [_halo(f.box) for f in placed]):
                placed.append(moved)
                break
    placed.sort(key=lambda f: f.box[3])
    img = background(rng, size, size, cfg.difficulty)
    lab = np.zeros((size, size), np.uint8)
    occ = np.zeros((size, size), np.uint8)
    for face in placed:
        _draw(img, lab, occ, face, rng)
        if rng.random() < 0.6 * cfg.difficulty:
            draw_occluder(img, lab, occ, face.lm19, face.lm106, face.box, rng)
    f32 = np.float32
    return Scene(
        image=finish(img, rng, cfg.difficulty),
        boxes=np.array([f.box for f in placed], f32).reshape(-1, 4),
        landmarks5=np.array([f.lm19[list(FIVE_FROM_19)] for f in placed], f32).reshape(-1, 5, 2),
        identities=tuple(f.ident.id for f in placed), jpeg_quality=_jpeg_quality(cfg, rng),
        caption=_caption(placed) if placed else "a synthetic photo with no face",
    )
