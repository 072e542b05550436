"""SynthFace parameters: the ``fetch.synthetic`` section of params.yaml.

Sizes are small by default so that ``dvc repro`` renders every set in seconds on one CPU core.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from mcf.params import ParamsError, param


@dataclass(frozen=True)
class AflwSynthConfig:
    """The AFLW-19-format alignment set (``AFLWinfo_release.mat`` + images)."""

    n_train: int = param(600, ge=1)
    n_test: int = param(200, ge=1)
    image_size: int = param(160, ge=64, le=2048)


@dataclass(frozen=True)
class LapaSynthConfig:
    """The LaPa-format parsing tree (images, label PNGs, 106-point landmark files)."""

    n_train: int = param(600, ge=1)
    n_val: int = param(100, ge=1)
    n_test: int = param(200, ge=1)
    image_size: int = param(160, ge=64, le=2048)


@dataclass(frozen=True)
class SynthConfig:
    """What SynthFace renders; every image is a pure function of (seed, set, index) and these values."""

    n_scenes: int = param(1200, ge=1)  # pre-training corpus scenes
    scene_size: int = param(192, ge=64, le=4096)  # corpus scene side in pixels
    max_faces: int = param(3, ge=1, le=3)  # faces per scene are drawn from 1..max_faces
    n_identities: int = param(200, ge=1)  # identity pool shared by the corpus, AFLW and LaPa sets
    aflw: AflwSynthConfig = field(default_factory=AflwSynthConfig)
    lapa: LapaSynthConfig = field(default_factory=LapaSynthConfig)
    difficulty: float = param(0.5, ge=0.0, le=1.0)  # scales pose range, occluders, blur and noise
    jpeg_quality: tuple[int, int] = (70, 95)  # inclusive range of JPEG qualities
    workers: int = param(2, ge=1)  # render processes; every image is the same for any count

    def __post_init__(self) -> None:
        lo, hi = self.jpeg_quality
        if not 1 <= lo <= hi <= 100:
            raise ParamsError("jpeg_quality", f"need 1 <= low <= high <= 100, got {self.jpeg_quality}")
