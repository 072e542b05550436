"""Pictures for the evaluate stage: CED curves, a confusion matrix, and prediction overlays (PNG).

The numbers behind every plot are also written as CSV by the stage, for ``dvc plots``; these PNGs are
for people reading the report.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import cv2
import matplotlib
import numpy as np

matplotlib.use("Agg")  # files only; never a window
import matplotlib.pyplot as plt  # noqa: E402

# Text drawn as given: a label from params ("SynthFace $\alpha$") is no maths to parse; an unknown
# symbol between two $ failed the stage at its plot, after the work. A decorator for every plot
literal_text = plt.rc_context({"text.parse_math": False})

# One colour per LaPa class (RGB), background black.
PALETTE = np.array(
    [
        [0, 0, 0], [255, 204, 153], [0, 128, 0], [0, 200, 100], [0, 0, 255], [0, 128, 255],
        [255, 0, 255], [255, 0, 0], [128, 0, 64], [200, 60, 60], [120, 60, 0],
    ],
    dtype=np.uint8,
)


@literal_text
def plot_ced(curves: Mapping[str, tuple[np.ndarray, np.ndarray]], path: Path, title: str) -> None:
    """Cumulative error distributions: ``{label: (thresholds, fraction of images <= threshold)}``."""
    fig, ax = plt.subplots(figsize=(5, 4))
    for label, (thresholds, fractions) in curves.items():
        ax.plot(thresholds, fractions, label=label)
    ax.set_xlabel("NME_box (a fraction of the box size; the metrics give it ×100)")
    ax.set_ylabel("fraction of test images")
    ax.set_ylim(0, 1)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


@literal_text
def plot_confusion(matrix: np.ndarray, names: Sequence[str], path: Path, title: str) -> None:
    """Row-normalised confusion matrix (rows: ground truth) with the share in each cell."""
    rows = matrix.sum(axis=1, keepdims=True)
    share = np.divide(matrix, rows, out=np.zeros(matrix.shape, dtype=np.float64), where=rows > 0)
    fig, ax = plt.subplots(figsize=(7, 6))
    ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(names)), names, rotation=60, ha="right")
    ax.set_yticks(range(len(names)), names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("ground truth")
    for (i, j), v in np.ndenumerate(share):
        if v >= 0.005:
            ax.text(j, i, f"{100 * v:.0f}", ha="center", va="center", fontsize=6,
                    color="white" if v > 0.5 else "black")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def draw_landmarks(image: np.ndarray, pred: np.ndarray, gt: np.ndarray | None = None) -> np.ndarray:
    """RGB image with predicted points (red) and ground truth (green), in the image's pixel coords.

    A point whose dot would not touch the image (a diverged model's, or one mapped from an absurd box) is
    left out: OpenCV takes only coordinates that fit an int, and NaN has no pixel.
    """
    out = image.copy()
    h, w = image.shape[:2]
    radius = max(1, round(max(h, w) / 160))
    for points, colour in ((gt, (0, 255, 0)), (pred, (255, 0, 0))):
        if points is None:
            continue
        for x, y in np.asarray(points):  # continuous coords; OpenCV's pixel centres sit at integers
            if -radius <= x <= w + radius and -radius <= y <= h + radius:
                cv2.circle(out, (int(round(x - 0.5)), int(round(y - 0.5))), radius, colour, -1, cv2.LINE_AA)
    return out


def blend_labels(image: np.ndarray, labels: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """RGB image with the class colours of ``labels`` (``[H, W]`` ids) blended over it."""
    colours = PALETTE[np.clip(labels, 0, len(PALETTE) - 1)]
    mix = (1 - alpha) * image.astype(np.float32) + alpha * colours.astype(np.float32)
    return np.where(labels[..., None] > 0, mix, image).astype(np.uint8)


def write_png(path: Path, image: np.ndarray) -> None:
    """Write an RGB (``[H, W, 3]``) or label (``[H, W]``) uint8 image losslessly."""
    data = cv2.cvtColor(image, cv2.COLOR_RGB2BGR) if image.ndim == 3 else image
    ok, png = cv2.imencode(".png", data)  # imwrite's bytes; its write said only False on a full disk
    if not ok:
        raise ValueError(f"could not encode {path} as PNG")
    Path(path).write_bytes(png.tobytes())  # the OS's error (ENOSPC), which the CLI names in one line


def read_png(path: Path) -> np.ndarray:
    """Read back what :func:`write_png` wrote (RGB or single-channel ids)."""
    data = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if data is None:
        raise OSError(f"could not read {path}")
    return cv2.cvtColor(data, cv2.COLOR_BGR2RGB) if data.ndim == 3 else data
