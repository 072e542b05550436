"""The frozen feature teacher of MCF's feature loss, and where it comes from.

A teacher spec (the teacher stage's ``teacher.source`` other than ``train``; pretrain loads
``mcf:<pretrain.teacher>``) is one of

- ``moco_v3:<path>``: a MoCo v3 checkpoint (``state_dict`` with keys ``module.base_encoder.*``; its
  ``head.*`` projector is dropped): the release's teacher;
- ``timm:<model name>:<weights file>``: ``timm.create_model(name, pretrained=False)`` (never a
  download) and the file's weights; ``timm:<model name>:random`` for a deliberately random one;
  ``timm:<weights file>``: a timm ViT state dict (or MAE's training checkpoint, its decoder left out),
  its size read from the weights;
- ``mcf:<path>``: an exported backbone folder (``save_backbone``) or one of our checkpoints;
- ``random``: a random ViT of the backbone's size, only when asked for by name.

Every teacher sees the crops as the student does, ImageNet-normalised (MoCo v3's own inputs); a timm
name whose timm weights expect another normalisation (CLIP's, or 0.5/0.5) is warned about.

A name without weights is an error rather than a silent random teacher, which would train a model
against noise and look fine until the downstream numbers come in.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

from mcf.data.pretrain_data import IMAGENET_MEAN, IMAGENET_STD
from mcf.models.backbone import BackboneConfig, create_backbone, load_backbone, read_weights
from mcf.models.release import backbone_from_checkpoint, encoder_state_dict
from mcf.params import checking_paths

log = logging.getLogger(__name__)

SPEC_FORMS = ("moco_v3:<path>", "timm:<model name>:<weights file|random>", "timm:<weights file>",
              "mcf:<path>", "random")


class FeatureTeacher(nn.Module):
    """A frozen timm ViT that returns the raw outputs of chosen blocks (before the final norm).

    Always in eval mode with ``requires_grad`` off; gradients still flow through its activations to
    its input, which is how the feature loss trains the decoder.

    Under autocast its residual stream is carried in the autocast dtype (``low_precision_residual``):
    fp32 position embeddings would otherwise lift it to fp32 for all blocks, and with two forward
    passes and one backward at full resolution, this frozen network's elementwise traffic is the
    step's largest. The teacher has no weights to update, so nothing accumulates the rounding.
    """

    low_precision_residual: bool = True

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        # a class check, not attributes: timm's Eva (EVA-02, vit_*_rope) has the same ones but another
        # forward (_pos_embed returns a pair), which would fail only at pretrain's first step
        if not isinstance(model, VisionTransformer):
            arch = getattr(model, "pretrained_cfg", {}).get("architecture")
            named = f" ({arch})" if arch else ""
            raise ValueError(f"teacher must be a timm VisionTransformer, not {type(model).__name__}{named}")
        self.model = model
        self.requires_grad_(False)
        self.train(False)

    @property
    def depth(self) -> int:
        return len(self.model.blocks)

    @property
    def img_size(self) -> tuple[int, int]:
        return tuple(self.model.patch_embed.img_size)

    def train(self, mode: bool = True) -> FeatureTeacher:
        """Stay in eval mode whatever the caller asks (``MCF.train()`` recurses into the teacher)."""
        return super().train(False)

    def forward(self, x: Tensor, layers: Sequence[int]) -> list[Tensor]:
        """[N, 3, H, W] → one [N, T, C] map per index in ``layers`` (0-based blocks, CLS included).

        Inputs of another size are resized (nearest, as the release's ``F.interpolate``).
        """
        if tuple(x.shape[-2:]) != self.img_size:
            x = F.interpolate(x, size=self.img_size)
        m = self.model
        x = m.norm_pre(m.patch_drop(m._pos_embed(m.patch_embed(x))))
        if self.low_precision_residual and torch.is_autocast_enabled(x.device.type):
            x = x.to(torch.get_autocast_dtype(x.device.type))
        wanted, outputs = set(layers), {}
        for i, block in enumerate(m.blocks[: max(layers) + 1]):
            x = block(x)
            if i in wanted:
                outputs[i] = x
        return [outputs[i] for i in layers]


def _parse(spec: str) -> tuple[str, str]:
    if spec == "random":
        return "random", ""
    scheme, sep, arg = spec.partition(":")
    if not sep or not arg or scheme not in ("moco_v3", "timm", "mcf"):
        raise ValueError(f"teacher spec {spec!r} is not valid; use one of: {', '.join(SPEC_FORMS)}")
    return scheme, arg


def validate_teacher_spec(spec: str) -> None:
    """Check a spec's form (not its files, which an earlier stage may still have to write)."""
    scheme, arg = _parse(spec)
    if scheme != "timm" or Path(arg).is_file():
        return
    name, sep, weights = arg.partition(":")
    if not timm.is_model(name):
        if not sep and not checking_paths():  # timm:<weights file> while another stage runs: not its input
            return
        raise ValueError(f"teacher spec {spec!r}: timm has no model {name!r} (and no such weights file)")
    if not sep or not weights:
        raise ValueError(
            f"teacher spec {spec!r}: a timm name needs weights (timm:{name}:<file>); "
            f"write timm:{name}:random to train against a random teacher on purpose"
        )


def weights_path(spec: str) -> str | None:
    """The file or folder ``spec`` reads its weights from (None for a random teacher).

    The teacher stage names it as its DVC input (``teacher.data``), so a replaced checkpoint reruns it.
    """
    scheme, arg = _parse(spec)
    if scheme == "random":
        return None
    if timm_name(spec) is not None:
        weights = arg.partition(":")[2]
        return None if weights == "random" else weights
    return arg


def timm_name(spec: str) -> str | None:
    """The timm model a ``timm:<model name>:<weights file|random>`` spec builds (None for other specs).

    The teacher stage's export names it: what it builds beyond the shapes (CLIP's pre-norm, no qkv bias,
    no class token, layer scale...) is not in the weights, so the plain ViT they suggest is another model.
    """
    scheme, arg = _parse(spec)
    if scheme != "timm" or Path(arg).is_file():
        return None
    name, sep, _ = arg.partition(":")
    return name if sep and timm.is_model(name) else None


def _load_strict(model: nn.Module, state: dict[str, Tensor], source: str) -> nn.Module:
    own = model.state_dict()
    wrong = [k for k, v in state.items() if k in own and v.shape != own[k].shape]
    if wrong:  # load_state_dict's RuntimeError would reach the user as a traceback
        k = wrong[0]
        raise ValueError(
            f"teacher weights {source} do not fit {type(model).__name__}: size mismatch for {k} "
            f"({tuple(state[k].shape)} in the file, {tuple(own[k].shape)} in the model; "
            f"{len(wrong)} weights in all)"
        )
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(
            f"teacher weights {source} do not fit {type(model).__name__}: "
            f"missing {result.missing_keys[:5]}, unexpected {result.unexpected_keys[:5]}"
        )
    return model


def _from_weights(obj: object, backbone_cfg: BackboneConfig, source: str) -> nn.Module:
    """A timm ViT sized from the weights themselves (heads from ``backbone_cfg`` when widths match)."""
    state, cfg = backbone_from_checkpoint(obj, like=backbone_cfg)
    return _load_strict(create_backbone(cfg), state, source)


def _load_moco_v3(path: str, backbone_cfg: BackboneConfig) -> nn.Module:
    ckpt = read_weights(path)
    keys = ckpt.get("state_dict")
    if not isinstance(keys, Mapping) or not any(str(k).startswith("module.base_encoder.") for k in keys):
        raise ValueError(f"{path}: not a MoCo v3 checkpoint (no state_dict with module.base_encoder.* keys)")
    base = {k: v for k, v in keys.items() if k.startswith("module.base_encoder.")}
    return _from_weights({"arch": ckpt.get("arch"), "state_dict": base}, backbone_cfg, path)  # arch: heads


def _load_timm(arg: str, backbone_cfg: BackboneConfig) -> nn.Module:
    if Path(arg).is_file():
        return _from_weights(read_weights(arg), backbone_cfg, arg)
    name, _, weights = arg.partition(":")
    model = timm.create_model(name, pretrained=False, num_classes=0)
    if weights == "random":
        log.warning("teacher: random timm %s, as the spec asks", name)
        return model
    expects = tuple(model.pretrained_cfg.get(k) for k in ("mean", "std"))
    if expects != (IMAGENET_MEAN, IMAGENET_STD):  # e.g. (0.5, 0.5) for vit_base_patch16_224, CLIP's
        log.warning(
            "teacher: timm's weights for %s expect inputs normalised with mean %s, std %s, but the teacher "
            "sees the crops as the student does (ImageNet mean/std): check that %s was trained on those",
            name, *expects, weights,
        )
    state = encoder_state_dict(read_weights(weights))
    return _load_strict(model, state, weights)


def _load_mcf(path: str, backbone_cfg: BackboneConfig) -> nn.Module:
    if Path(path).is_dir():
        return load_backbone(path)
    return _from_weights(read_weights(path), backbone_cfg, path)


def load_teacher(spec: str, backbone_cfg: BackboneConfig) -> FeatureTeacher:
    """Build the frozen teacher named by ``spec`` (see the module docstring); never downloads."""
    validate_teacher_spec(spec)
    scheme, arg = _parse(spec)
    with torch.random.fork_rng(devices=[]):  # the student built next starts alike with or without it
        if scheme == "random":
            log.warning("teacher: random ViT of the backbone's size, as the spec asks")
            model = create_backbone(backbone_cfg)
        else:
            loader = {"moco_v3": _load_moco_v3, "timm": _load_timm, "mcf": _load_mcf}[scheme]
            model = loader(arg, backbone_cfg)
    teacher = FeatureTeacher(model)
    log.info("teacher %s: depth %d, input %s", spec, teacher.depth, teacher.img_size)
    return teacher
