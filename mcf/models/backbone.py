"""The ViT backbone as timm builds it, and the export format that crosses pretrain → finetune.

An exported backbone is a folder with

- ``backbone.pth``: a ``timm.models.VisionTransformer`` state dict (timm key names);
- ``backbone.json``: ``{"model_name": ..., "kwargs": {...}}`` such that
  ``timm.create_model(model_name, pretrained=False, **kwargs)`` builds the matching module.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path
from typing import Any

import timm
import torch
import torch.nn.functional as F
from timm.layers import PatchEmbed
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

from mcf.errors import WeightsError
from mcf.io import atomic_file, save_tensors
from mcf.params import param


@dataclasses.dataclass(frozen=True)
class BackboneConfig:
    """ViT size. The paper's is ViT-B/16 at 224 (embed 768, depth 12, 12 heads)."""

    img_size: int = param(224, ge=16)
    patch_size: int = param(16, ge=1)
    embed_dim: int = param(768, ge=8)
    depth: int = param(12, ge=1)
    num_heads: int = param(12, ge=1)
    mlp_ratio: float = param(4.0, gt=0)

    def __post_init__(self) -> None:
        from mcf.params import ParamsError

        if self.img_size % self.patch_size:
            raise ParamsError("img_size", f"must be a multiple of patch_size {self.patch_size}")
        if self.embed_dim % self.num_heads:
            raise ParamsError("embed_dim", f"must be a multiple of num_heads {self.num_heads}")

    def timm_kwargs(self) -> dict[str, Any]:
        """Arguments for ``timm.create_model('vit_base_patch16_224', **kwargs)``: the release's ViT."""
        return {
            "img_size": self.img_size,
            "patch_size": self.patch_size,
            "embed_dim": self.embed_dim,
            "depth": self.depth,
            "num_heads": self.num_heads,
            "mlp_ratio": self.mlp_ratio,
            "qkv_bias": True,
            "num_classes": 0,
            "global_pool": "token",
        }


MODEL_NAME = "vit_base_patch16_224"  # timm's ViT family; the kwargs above set the size


class LinearPatchEmbed(PatchEmbed):
    """timm's patch embedding, computed as one matrix product over the flattened patches.

    The same weights (``proj``, a ``Conv2d``) and the same function as the strided convolution, which
    cuDNN ran at 28 TFLOP/s on an H200 for ViT-B/16's batch of 256 in bf16 (2.1 ms a call); as a matrix
    product it runs at the other layers' rate, and the compiled pre-training step went from 142 to
    129 ms. Inputs the fast form does not cover take timm's own path, with its checks.
    """

    def forward(self, x: Tensor) -> Tensor:
        n, c, h, w = x.shape
        ph, pw = self.patch_size
        strict = self.img_size is not None and self.strict_img_size and (h, w) != tuple(self.img_size)
        if self.dynamic_img_pad or not self.flatten or h % ph or w % pw or strict:
            return super().forward(x)
        patches = x.reshape(n, c, h // ph, ph, w // pw, pw).permute(0, 2, 4, 1, 3, 5)
        weight = self.proj.weight.reshape(self.proj.out_channels, -1)  # (c, ph, pw) order, as the patches
        return self.norm(F.linear(patches.reshape(n, -1, c * ph * pw), weight, self.proj.bias))


def check_model_name(model_name: Any) -> None:
    """A name of timm's own registry: ``timm.create_model`` fetches an ``hf-hub:`` name's config from the
    Hugging Face hub and reads a ``local-dir:`` one's folder, and names come from files (backbone.json,
    a fine-tuned model.pt) that may be handed over by anyone."""
    if not isinstance(model_name, str) or ":" in model_name or not timm.is_model(model_name):
        raise WeightsError(f"{model_name!r} is not a timm model name (builds never fetch a model)")


def build_vit(model_name: str, **kwargs: Any) -> nn.Module:
    """``timm.create_model`` (never a download) with :class:`LinearPatchEmbed`: every backbone the
    project trains, exports or rebuilds comes from here, so all run the same patch embedding.

    Only timm's plain ``PatchEmbed`` is swapped for the linear form (the same weights and state): passed
    as ``embed_layer``, it replaced a hybrid ViT's ResNet stem (``HybridEmbed``), so such a teacher's export
    could not be rebuilt. A model that is not a timm ``VisionTransformer`` is a ``TypeError``.
    """
    check_model_name(model_name)
    model = timm.create_model(model_name, pretrained=False, **kwargs)
    if not isinstance(model, VisionTransformer):
        raise TypeError(f"{model_name} builds a {type(model).__name__}, not a timm VisionTransformer")
    if type(model.patch_embed) is PatchEmbed:
        model.patch_embed.__class__ = LinearPatchEmbed  # adds no state: only its forward differs
    return model


def create_backbone(cfg: BackboneConfig, **overrides: Any) -> nn.Module:
    """A randomly initialised timm ``VisionTransformer`` of the configured size."""
    return build_vit(MODEL_NAME, **{**cfg.timm_kwargs(), **overrides})


def save_backbone(model: nn.Module, cfg: BackboneConfig, out_dir: str | Path) -> None:
    """Write the export of a ViT of size ``cfg`` into ``out_dir`` (see :func:`save_export`)."""
    save_export(model, {"model_name": MODEL_NAME, "kwargs": cfg.timm_kwargs()}, out_dir)


def save_export(model: nn.Module, spec: dict[str, Any], out_dir: str | Path) -> None:
    """Write ``backbone.pth`` and ``backbone.json`` (``spec``: model_name and kwargs; atomically, each)."""
    out_dir = Path(out_dir)
    with atomic_file(out_dir / "backbone.pth") as tmp:
        save_tensors({k: v.detach().cpu() for k, v in model.state_dict().items()}, tmp)
    with atomic_file(out_dir / "backbone.json") as tmp:
        tmp.write_text(json.dumps(spec, indent=2))


def read_weights(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint file safely (``weights_only``; safetensors by suffix): every weights file the
    project reads comes through here, so each failure names its file.

    MAE-style training checkpoints (the release's own script writes them) also hold their
    ``argparse.Namespace``: that plain attribute bag is allowed, and nothing else beyond tensors.
    """
    path = Path(path)
    if path.is_dir():  # e.g. a stage's output folder given for the checkpoint.pt inside it
        inside = sorted(p.name for p in path.iterdir() if p.suffix in (".pt", ".pth", ".tar", ".safetensors"))
        hint = f" (it holds {', '.join(inside[:3])})" if inside else ""
        raise WeightsError(f"{path} is a folder, not a weights file{hint}")
    if not path.is_file():
        raise WeightsError(f"weights file not found: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        with torch.serialization.safe_globals([argparse.Namespace]):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a damaged file fails in many ways (KeyError, EOFError, RuntimeError...)
        lines = str(err).splitlines()
        # "Unsupported global: GLOBAL x.y ...", or for a module torch blocks (os, subprocess ...) "Trying to
        # load unsupported GLOBAL posix.system whose module posix is blocked"
        foreign = [
            ln.split(". Please")[0].strip().rstrip(".") for ln in lines if "unsupported global" in ln.lower()
        ]
        if foreign:
            raise WeightsError(
                f"{path}: not a weights-only PyTorch checkpoint ({foreign[0]}); it is not loaded with full "
                "unpickling, which could run code from the file"
            ) from None
        # torch's weights-only refusal of a file that is no pickle at all ("Unsupported operand 35") comes
        # after two sentences of advice to load it unsafely: keep the reason only
        reason = str(err).split("WeightsUnpickler error:")[-1].split("Check the documentation")[0]
        why = " ".join(f"{type(err).__name__}: {reason}".split()).removesuffix(":")[:160]
        raise WeightsError(f"{path}: cannot be read as a PyTorch checkpoint ({why}): cut short, damaged, "
                           "or another format") from None
    if not isinstance(obj, dict):
        raise WeightsError(f"{path}: expected a dict checkpoint, got {type(obj).__name__}")
    return obj


def read_spec(export_dir: str | Path) -> dict[str, Any]:
    """The ``backbone.json`` of an export: ``{"model_name": ..., "kwargs": {...}}``."""
    path = Path(export_dir) / "backbone.json"
    if not path.is_file():  # pretrain's output folder holds its exports one level down
        inner = [str(d.parent) for d in sorted(Path(export_dir).glob("*/backbone.json")) if d.is_file()]
        hint = f"the exports inside are {', '.join(inner)}" if inner else "run the stage that writes it first"
        raise WeightsError(f"no exported backbone at {path} ({hint})")
    try:
        spec = json.loads(path.read_text())
    except ValueError as err:  # cut short or damaged (UnicodeDecodeError is one too)
        raise WeightsError(f"{path}: not a backbone spec ({type(err).__name__}: {err})") from None
    if not isinstance(spec, dict) or not {"model_name", "kwargs"} <= spec.keys():
        raise WeightsError(f"{path}: not a backbone spec (expected keys model_name and kwargs)")
    try:
        check_model_name(spec["model_name"])
    except WeightsError as err:
        raise WeightsError(f"{path}: {err}") from None
    return spec


def load_backbone(export_dir: str | Path, **overrides: Any) -> nn.Module:
    """Build the exported backbone and load its weights (strict; ``weights_only`` for safety).

    ``overrides`` change construction only where the weights allow it, e.g. ``img_size`` for a
    downstream resolution: the position grid is resampled on load as FaRL does (bicubic, the rows of the
    class and register tokens kept).
    Only from the grid backbone.json gives: weights of another size are another export's.
    """
    spec = read_spec(export_dir)
    try:
        model = build_vit(spec["model_name"], **{**spec["kwargs"], **overrides})
    except (TypeError, ValueError, AssertionError) as err:  # timm asserts on some sizes (heads vs width)
        where = Path(export_dir) / "backbone.json"
        raise WeightsError(f"{where}: {spec['model_name']} is not a ViT these kwargs build "
                           f"({type(err).__name__}: {str(err)[:160]})") from None
    state = read_weights(Path(export_dir) / "backbone.pth")
    pos = state.get("pos_embed")
    if overrides and pos is not None and pos.shape != model.pos_embed.shape:
        with torch.device("meta"):  # backbone.json's own grid; another is a mixed pair, refused below
            own = build_vit(spec["model_name"], **spec["kwargs"]).pos_embed.shape
        if pos.shape == own:
            from timm.layers import resample_abs_pos_embed

            # FaRL's kernel (plain bicubic, align_corners False); timm's default antialias=True is PIL's.
            # The rows ahead of the grid: the class and register tokens the table embeds (an export of a
            # timm teacher may have none, as without class token, or leave them out, as no_embed_class)
            prefix = 0 if getattr(model, "no_embed_class", False) else model.num_prefix_tokens
            grid = model.patch_embed.grid_size
            state["pos_embed"] = resample_abs_pos_embed(
                pos, list(grid), num_prefix_tokens=prefix, antialias=False
            )
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:  # the two files of different exports
        first = str(err).splitlines()[1].strip() if "\n" in str(err) else str(err)
        raise WeightsError(f"{export_dir}: backbone.pth does not fit backbone.json ({first[:200]})") from None
    return model
