"""Interop with the official MCF release's state-dict layout, and the backbone export.

Release key → MCF key (first matching prefix wins; see
``tests/data/mcf_release_vit_b16_state_dict_keys.tsv``):

=============================  ============================
``online_encoder.fc.*``        ``projector.*``
``online_encoder.*``           ``encoder.*`` (timm ViT)
``target_encoder.fc.*``        ``momentum_projector.*``
``target_encoder.*``           ``momentum_encoder.*``
``perceptual_loss.model.*``    ``teacher.model.*`` (``head.*`` dropped)
``predictor.*``, ``decoder_*``, ``mask_token``: unchanged
=============================  ============================

A checkpoint may hold the state dict at its top level, under ``model`` (the release, MAE's training
checkpoints, our pretrain checkpoints) or under ``state_dict`` (MoCo v3); a DDP ``module.`` prefix is
stripped. A backbone under timm's own names may sit beside a classifier ``head.*`` or MAE's decoder
(``decoder_*``, ``mask_token``), which are left out.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from mcf.models.backbone import BackboneConfig, create_backbone, read_spec, read_weights, save_backbone
from mcf.params import ParamsError, build

log = logging.getLogger(__name__)

RELEASE_TO_MCF: tuple[tuple[str, str], ...] = (
    ("online_encoder.fc.", "projector."),
    ("online_encoder.", "encoder."),
    ("target_encoder.fc.", "momentum_projector."),
    ("target_encoder.", "momentum_encoder."),
    ("perceptual_loss.model.", "teacher.model."),
    ("predictor.", "predictor."),
    ("decoder_", "decoder_"),
    ("mask_token", "mask_token"),
)
# Backbone key layouts, tried in order: (prefix, sub-prefixes that are not the backbone).
_BACKBONE_LAYOUTS = (("encoder.", ()), ("online_encoder.", ("fc.",)), ("base_encoder.", ("head.",)))
# Beside timm-named encoder weights: a classifier head, and MAE's decoder (its training checkpoints hold
# the whole MaskedAutoencoderViT under ``model``)
_NOT_TIMM_ENCODER = ("head.", "decoder_", "mask_token")


@dataclasses.dataclass(frozen=True)
class LoadReport:
    """What :func:`load_release_state_dict` did, by key."""

    loaded: list[str]
    missing: list[str]  # MCF keys the release did not provide (e.g. none here for a full model)
    unexpected: list[str]  # release keys with no place in this model (e.g. contrastive switched off)
    dropped: list[str]  # release keys deliberately not used (the teacher's classifier head)


def _rename(key: str, table: tuple[tuple[str, str], ...]) -> str | None:
    for old, new in table:
        if key.startswith(old):
            return new + key[len(old):]
    return None


def unwrap_state_dict(obj: Mapping[str, Any]) -> dict[str, Tensor]:
    """The tensor mapping inside a checkpoint (top level, ``model`` or ``state_dict``), no ``module.``."""
    for key in ("model", "state_dict"):
        if isinstance(obj.get(key), Mapping):
            obj = obj[key]
            break
    state = {k: v for k, v in obj.items() if isinstance(v, Tensor)}
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def encoder_state_dict(obj: Mapping[str, Any]) -> dict[str, Tensor]:
    """The online ViT's weights under timm names, from any layout this project meets."""
    state = unwrap_state_dict(obj)
    for prefix, skip in _BACKBONE_LAYOUTS:
        sub = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        if sub:
            return {k: v for k, v in sub.items() if not k.startswith(skip)}
    if "patch_embed.proj.weight" in state:  # timm's ViT, or MAE's whole model (decoder beside encoder)
        return {k: v for k, v in state.items() if not k.startswith(_NOT_TIMM_ENCODER)}
    raise ValueError(
        "no ViT backbone in checkpoint: expected encoder.*, online_encoder.*, module.base_encoder.* "
        f"or timm keys; found e.g. {sorted(state)[:5]}"
    )


# The published ViTs whose heads are wider than 64 channels: ViT-H (MAE's and timm's), ViT-g and ViT-G
# all have 16. Width // 64 would give 20, 22 and 26: another attention, with nothing in the shapes to say so
WIDE_VIT_HEADS = {1280: 16, 1408: 16, 1664: 16}


def infer_backbone_config(state: Mapping[str, Tensor], num_heads: int | None = None) -> BackboneConfig:
    """Read a ViT's size from its weights; heads are not in the shapes (default: the published ViT of that
    width's, 64 channels each below ViT-H)."""
    for key, ndim in (("patch_embed.proj.weight", 4), ("pos_embed", 3), ("blocks.0.mlp.fc1.weight", 2)):
        if key not in state:
            raise ValueError(f"cannot size the ViT: weight {key!r} is missing")
        if state[key].ndim != ndim:  # a foreign or hand-edited file: an IndexError traceback otherwise
            raise ValueError(f"cannot size the ViT: weight {key!r} has shape {tuple(state[key].shape)}, "
                             f"not {ndim} dimensions")
    embed, _, patch, _ = state["patch_embed.proj.weight"].shape
    tokens = state["pos_embed"].shape[1] - 1
    grid = math.isqrt(tokens)
    if grid * grid != tokens:
        square = math.isqrt(tokens + 1) ** 2 == tokens + 1  # e.g. a timm model without class token
        why = "a square grid with no class-token slot" if square else "not a class-token slot + a square grid"
        raise ValueError(f"pos_embed has {tokens + 1} positions, {why}: not a plain ViT")
    blocks = {k.split(".")[1] for k in state if k.startswith("blocks.")}
    if odd := sorted(b for b in blocks if not b.isdigit()):
        raise ValueError(f"cannot size the ViT: blocks.{odd[0]}.* is no numbered block")
    depth = 1 + max(map(int, blocks))
    heads = (WIDE_VIT_HEADS.get(embed) or max(1, embed // 64)) if num_heads is None else num_heads
    if heads < 1 or embed % heads:
        raise ValueError(f"{heads} attention heads do not divide the embedding width {embed}")
    hidden = state["blocks.0.mlp.fc1.weight"].shape[0]
    mlp_ratio = hidden / embed
    while int(embed * mlp_ratio) < hidden:  # timm builds int(embed * ratio): 224 * (488 / 224) gives 487
        mlp_ratio = math.nextafter(mlp_ratio, math.inf)
    return BackboneConfig(
        img_size=grid * patch, patch_size=patch, embed_dim=embed, depth=depth, num_heads=heads,
        mlp_ratio=mlp_ratio,
    )


# MoCo v3's ViTs (its vits.py, named by the checkpoint's ``arch``) all have 12 heads: its ViT-S too, where
# timm's ViT-S and the 64-channel default have 6 (heads are not in the weights' shapes)
MOCO_V3_HEADS = {"vit_small": 12, "vit_base": 12}


def backbone_from_checkpoint(
    obj: Mapping[str, Any], num_heads: int | None = None, like: BackboneConfig | None = None
) -> tuple[dict[str, Tensor], BackboneConfig]:
    """Backbone weights and size from a checkpoint.

    The size comes from a ``backbone`` entry (``dataclasses.asdict(BackboneConfig)``) when the
    checkpoint has one, else from the shapes; heads from ``num_heads``, else from a MoCo v3 ``arch``,
    else from ``like`` when the widths match, else the published ViT's of that width (infer_backbone_config).
    """
    state = encoder_state_dict(obj)
    if isinstance(obj.get("backbone"), Mapping):
        try:  # checked as params.yaml's sizes: a foreign or hand-edited entry's unknown key, text or 0
            return state, build(BackboneConfig, dict(obj["backbone"]), "backbone")
        except ParamsError as err:  # a ValueError, but not one of the params file the stages name
            raise ValueError(f"the checkpoint's backbone entry is not a ViT size ({err})") from None
    arch = obj.get("arch")
    if num_heads is None and isinstance(arch, str):
        num_heads = MOCO_V3_HEADS.get(arch)
    patch = state.get("patch_embed.proj.weight")  # absent: infer_backbone_config says so
    if num_heads is None and like is not None and patch is not None and patch.shape[0] == like.embed_dim:
        num_heads = like.num_heads
    return state, infer_backbone_config(state, num_heads)


def load_release_state_dict(model: nn.Module, obj: Mapping[str, Any], assign: bool = False) -> LoadReport:
    """Load a release-layout state dict into an :class:`~mcf.models.mcf.MCF` model.

    The backbone must fit exactly (no missing or unexpected ``encoder.*`` weights, same shapes), or
    this raises ``ValueError``; other parts load where the model has them and are reported otherwise.
    ``assign`` adopts the checkpoint's tensors (for a model built on the meta device: no wasted init).
    """
    own = model.state_dict()
    loaded: dict[str, Tensor] = {}
    unexpected, dropped = [], []
    for key, value in unwrap_state_dict(obj).items():
        new = _rename(key, RELEASE_TO_MCF)
        if new is not None and new.startswith("teacher.model.head."):
            dropped.append(key)
        elif new is None or new not in own:
            unexpected.append(key)
        elif own[new].shape != value.shape:
            raise ValueError(f"{key}: shape {tuple(value.shape)} does not fit {new} {tuple(own[new].shape)}")
        else:
            loaded[new] = value
    missing = [k for k in own if k not in loaded]
    bad = [k for k in missing if k.startswith("encoder.")]
    bad += [k for k in unexpected if (_rename(k, RELEASE_TO_MCF) or "").startswith("encoder.")]
    if bad:
        raise ValueError(f"release backbone does not match the model: {bad[:8]}")
    model.load_state_dict(loaded, strict=False, assign=assign)
    log.info("release weights: %d loaded, %d missing, %d unexpected, %d dropped",
             len(loaded), len(missing), len(unexpected), len(dropped))
    return LoadReport(sorted(loaded), missing, unexpected, dropped)


def to_release_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The model's state dict under the release's key names (the inverse of the table above)."""
    inverse = tuple((new, old) for old, new in RELEASE_TO_MCF)
    out = {}
    for key, value in model.state_dict().items():
        new = _rename(key, inverse)
        if new is None:
            raise ValueError(f"{key}: no release name for this weight")
        out[new] = value
    return out


def _export_heads(path: Path) -> int | None:
    """The head count of an earlier export's ``backbone.pth``, from the ``backbone.json`` beside it:
    heads are not in the weights' shapes, and the width's usual count computes another attention."""
    if path.name != "backbone.pth" or not (path.parent / "backbone.json").is_file():
        return None
    heads = read_spec(path.parent)["kwargs"].get("num_heads")
    return heads if isinstance(heads, int) and not isinstance(heads, bool) else None


def export_backbone(
    source: nn.Module | Mapping[str, Any] | str | Path, out_dir: str | Path, num_heads: int | None = None
) -> BackboneConfig:
    """Write the online encoder as a timm backbone folder (``save_backbone``) and return its size.

    ``source``: an MCF model, a checkpoint mapping, or a checkpoint file (ours, the release's, MoCo
    v3's or a plain timm state dict). The weights load strictly into ``create_backbone`` first, so a
    written export always loads into ``timm.create_model``.
    """
    if isinstance(source, nn.Module):
        cfg, encoder = source.cfg.backbone, source.encoder
    else:
        if isinstance(source, str | Path) and num_heads is None:
            num_heads = _export_heads(Path(source))
        obj = read_weights(source) if isinstance(source, str | Path) else source
        state, cfg = backbone_from_checkpoint(obj, num_heads)
        with torch.device("meta"):  # every weight comes from the checkpoint: skip the random init
            encoder = create_backbone(cfg)
        try:
            encoder.load_state_dict(state, strict=True, assign=True)
        except RuntimeError as err:  # a weight missing or extra: one line for the user, not a traceback
            first = str(err).splitlines()[1].strip() if "\n" in str(err) else str(err)
            raise ValueError(f"its backbone does not fit a timm ViT ({first[:200]})") from None
    save_backbone(encoder, cfg, out_dir)  # the caller names what it wrote (`mcf export`: a temporary dir)
    return cfg
