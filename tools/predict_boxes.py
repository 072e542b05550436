"""How much a detector's box costs `mcf predict` against the AFLW-19 box the model was trained on.

Runs the alignment model of a finished `dvc repro` on the AFLW-19 test split twice: from each image's
annotated box and from the Haar detector's largest face, and prints NME_diag (×100) over the images
where Haar finds a face. On the default run this is SynthFace, and the numbers are SynthFace's.

    python tools/predict_boxes.py [outputs/finetune_alignment/mcf/model.pt]
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

from mcf.data.aflw19 import AFLW19, AFLW19Config, read_mat, read_rgb
from mcf.data.detect import DetectorConfig, make_detector
from mcf.errors import StageError
from mcf.evaluate import metrics as M
from mcf.predict import align_face, load_task
from mcf.synth.writers import is_synthface


def main(model_path: str = "outputs/finetune_alignment/mcf/model.pt") -> None:
    model, meta = load_task(model_path, "alignment")
    cfg = AFLW19Config(**meta["data"])
    # named as evaluate labels it: a SynthFace figure must never read as an AFLW-19 one
    data = f"{'SynthFace-AFLW19' if is_synthface(cfg.root) else 'AFLW-19'} at {cfg.root}"
    dataset, ann = AFLW19(cfg, "full"), read_mat(cfg.root)
    detect = make_detector(DetectorConfig(min_size=16))
    rows, annotated, detected = [], [], []
    for i, row in enumerate(dataset.indices):
        rgb = read_rgb(dataset.image_path(i))
        faces = detect(rgb)
        if not faces:
            continue
        left, right, top, bottom = ann.boxes[row]
        rows.append(row)
        annotated.append(align_face(model, cfg, rgb, (left, top, right, bottom)))
        detected.append(align_face(model, cfg, rgb, faces[0].box))
    print(f"{data}: Haar finds a face in {len(rows)} of {len(dataset)} test images")
    if not rows:
        return
    gt, box = ann.points[rows], ann.boxes[rows]
    for name, pred in (("annotated box", annotated), ("Haar box", detected)):
        print(f"NME_diag with the {name}: {100 * M.nme(np.array(pred), gt, 'diag', box).mean():.2f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", nargs="?", default="outputs/finetune_alignment/mcf/model.pt",
                        help="finetune_alignment's model.pt (default: %(default)s)")
    try:
        main(parser.parse_args().model)
    except StageError as err:  # a missing, damaged or parsing model: one line, as `mcf predict` says it
        sys.exit(f"predict_boxes: {err}")
