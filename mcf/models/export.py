"""``mcf export --checkpoint PATH --out DIR``: the pre-trained backbone as a timm state dict.

Takes our pretrain checkpoint or the official release's file (state dict at the top level or under
``model``) and writes ``backbone.pth`` + ``backbone.json`` (see :mod:`mcf.models.backbone`), which
``timm.create_model`` and ``load_backbone`` read back.
"""

from __future__ import annotations

import argparse
import logging

from mcf.cli import describe, given
from mcf.errors import StageError
from mcf.io import atomic_dir, resolved
from mcf.models.backbone import read_weights
from mcf.models.release import export_backbone
from mcf.train.checkpoint import nonfinite

log = logging.getLogger(__name__)


def cli(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="mcf export", description=describe(__doc__),
                                epilog="Exit status: 0 written, 1 the checkpoint or output folder refused, "
                                "2 a usage error.")
    p.add_argument(
        "--checkpoint", required=True, type=given,
        help="pretrain's checkpoint.pt (e.g. outputs/pretrain/checkpoint.pt), the release's .pth, a MoCo v3, "
        "MAE or timm ViT checkpoint (.safetensors too), or an export's backbone.pth",
    )
    p.add_argument(
        "--out", required=True, type=given,
        help="output folder for backbone.pth and backbone.json (the README shows how timm loads them); an "
        "earlier export there is replaced whole; a file, or a folder holding other files, is refused",
    )
    p.add_argument(
        "--num-heads", type=int, default=None,
        help="attention heads, when the checkpoint does not record its backbone size "
        "(default: an exported backbone.pth's backbone.json; 12 for a MoCo v3 checkpoint's "
        "vit_small/vit_base; else the published ViT's of that width: embed_dim / 64 for ViT-Ti/S/B/L, "
        "16 for ViT-H/g/G)",
    )
    args = p.parse_args(argv)
    if args.num_heads is not None and args.num_heads < 1:
        p.error(f"--num-heads must be at least 1, got {args.num_heads}")
    if resolved(args.out) in resolved(args.checkpoint).parents:  # replaced whole, it goes too
        p.error(f"--out {args.out} holds --checkpoint {args.checkpoint}, which replacing the folder would "
                "delete; name another folder")
    try:
        with atomic_dir(args.out, sign="backbone.json") as tmp:  # both files or neither
            cfg = export_backbone(args.checkpoint, tmp, num_heads=args.num_heads)
            # a diverged run's weights (the release's script has no guard): fine-tuning would fail on them
            if bad := nonfinite(read_weights(tmp / "backbone.pth")):
                raise ValueError(f"{len(bad)} tensors hold NaN or infinite weights, e.g. {bad[:3]}")
    except ValueError as err:
        # a weights error names the file already
        raise StageError(f"cannot export {args.checkpoint}: {str(err).removeprefix(f'{args.checkpoint}: ')}"
                         ) from err
    log.info("wrote %s (ViT %dx%d, patch %d, %d px)", args.out, cfg.embed_dim, cfg.depth, cfg.patch_size,
             cfg.img_size)
    return 0
