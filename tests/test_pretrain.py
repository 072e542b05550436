"""Pretrain and teacher stages on a tiny ViT and a few crops: schedule, data order, guards, outputs.

The helpers at the top (``make_workspace``, ``write_params``) are shared with test_resume.py and
test_ddp.py: a subset of synthetic crops in the real shard format plus a random teacher export.
"""

from __future__ import annotations

import copy
import dataclasses
import errno
import functools
import json
import math
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from PIL import Image
from torch.utils.data import DataLoader

from mcf.cli import main as cli_main
from mcf.data.pretrain_data import CropDataset, EpochView, raised_as_in_workers, steps_per_epoch
from mcf.data.shards import encode_jpeg, iter_encoded, shard_urls, write_shards
from mcf.errors import StageError
from mcf.io import save_tensors
from mcf.models import mcf as mcf_model
from mcf.models.backbone import BackboneConfig, create_backbone, load_backbone, save_backbone
from mcf.models.mcf import MCF, MCFConfig
from mcf.models.release import export_backbone
from mcf.models.teacher import FeatureTeacher, load_teacher
from mcf.params import Common, ParamsError, load
from mcf.train import pretrain, teacher
from mcf.train.checkpoint import (
    check_resume_dir,
    discard_resume,
    load_checkpoint,
    nonfinite,
    rng_state,
    run_hash,
    save_checkpoint,
    set_rng_state,
    truncate_live,
    weights_digest,
)
from mcf.train.loop import Run, TrainConfig, Trainer, accumulate, data_identity, param_groups
from mcf.train.schedule import lr_at, scaled_lr, set_lr

TINY = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2}


def make_workspace(root: Path, n: int = 96) -> Path:
    """Write ``root/subset/shards`` (``n`` 40-px crops: a coloured square on a plain ground) and a
    random teacher export in ``root/teacher``."""
    rng = np.random.default_rng(0)

    def samples() -> Any:
        for i in range(n):
            img = np.full((40, 40, 3), rng.integers(0, 256, 3), np.uint8)
            y, x = rng.integers(6, 34, 2)
            img[y - 6 : y + 6, x - 6 : x + 6] = rng.integers(0, 256, 3)
            yield f"crop{i:05d}", encode_jpeg(img), {"crop_id": f"crop{i:05d}"}

    write_shards(samples(), root / "subset" / "shards", shard_size=40)
    torch.manual_seed(0)
    save_backbone(create_backbone(BackboneConfig(**TINY)), BackboneConfig(**TINY), root / "teacher")
    return root


def write_params(root: Path, name: str = "params.yaml", **train: Any) -> Path:
    """A params file for both stages at the tiny size; ``train`` overrides pretrain.train keys."""
    train_cfg = {"epochs": 2, "warmup_epochs": 1, "batch_size": 8, "ckpt_every": 1, "log_every": 1, **train}
    decoder = {"decoder_dim": 16, "decoder_depth": 1, "decoder_heads": 2}
    params = {
        "seed": 0,
        "mask_ratio": 0.75,
        "teacher": {
            "data": str(root / "subset"), "out": str(root / "teacher_trained"),
            "resume_dir": str(root / ".resume" / "teacher"), "backbone": TINY, **decoder,
            "train": {"epochs": 1, "warmup_epochs": 0, "batch_size": 16},
        },
        "pretrain": {
            "data": str(root / "subset"), "teacher": str(root / "teacher"), "out": str(root / name[:-5]),
            "live": str(root / "metrics" / name[:-5]), "resume_dir": str(root / ".resume" / name[:-5]),
            "model": {
                "backbone": TINY, **decoder, "feature_layers": [0, 1],
                "proj_hidden": 32, "proj_dim": 16, "pred_hidden": 32,
            },
            "train": train_cfg,
        },
    }
    path = root / name
    path.write_text(yaml.safe_dump(params))
    return path


def tsv_column(path: Path, column: str) -> list[float]:
    header, *rows = path.read_text().splitlines()
    index = header.split("\t").index(column)
    return [float(r.split("\t")[index]) for r in rows]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_workspace(tmp_path_factory.mktemp("pretrain"))


def test_lr_schedule_formula() -> None:
    assert scaled_lr(1.5e-4, 4096) == pytest.approx(2.4e-3)  # the paper: 8 GPUs × 64 × 8 accumulation
    peak, total, warmup = 1e-3, 100, 10
    assert lr_at(0, total, warmup, peak) == 0.0
    assert lr_at(5, total, warmup, peak) == pytest.approx(5e-4)
    assert lr_at(10, total, warmup, peak) == pytest.approx(peak)
    assert lr_at(55, total, warmup, peak) == pytest.approx(peak * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_at(99, total, warmup, peak, min_lr=1e-5) == pytest.approx(
        1e-5 + (peak - 1e-5) * 0.5 * (1 + math.cos(math.pi * 89 / 90))
    )
    assert lr_at(3, total, 0, peak) == pytest.approx(peak * 0.5 * (1 + math.cos(math.pi * 3 / 100)))


def test_lr_curve_where_its_pieces_meet() -> None:
    """``lr_at`` at the seams the loop reaches: the warm-up starts at 0 whatever ``min_lr`` (the release's
    lr × epoch / warmup) and is linear to its last step; without warm-up step 0 is the peak (not 0 / 0); a
    fractional warm-up of 1.5 steps is used unrounded, in the decay's length too; the half-cosine ends at
    ``min_lr`` exactly and stays there past the end instead of climbing back."""
    peak, min_lr = 1e-3, 1e-5
    assert lr_at(0, 100, 10, peak, min_lr) == 0.0
    assert lr_at(9, 100, 10, peak, min_lr) == pytest.approx(9e-4)
    assert lr_at(0, 100, 0, peak) == peak
    assert lr_at(1, 24, 1.5, peak) == pytest.approx(peak / 1.5)
    assert lr_at(12, 24, 1.5, peak) == pytest.approx(peak * 0.5 * (1 + math.cos(math.pi * 10.5 / 22.5)))
    assert [lr_at(s, 100, 10, peak, min_lr) for s in (100, 150)] == [min_lr, min_lr]


def test_set_lr_writes_every_param_group() -> None:
    """The weight-decay and no-decay groups (MAE's) train at one lr: a ``set_lr`` that wrote only the
    first would leave the norms and biases at the lr the optimizer was built with."""
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.LayerNorm(2))
    optimizer = torch.optim.AdamW(param_groups(model, 0.05), lr=1.0)
    set_lr(optimizer, 2.5e-4)
    assert len(optimizer.param_groups) == 2
    assert [group["lr"] for group in optimizer.param_groups] == [2.5e-4, 2.5e-4]


def test_crops_of_another_size_are_resized_as_the_release_resizes_them(workspace: Path) -> None:
    """The release's ``transforms.Resize(input_size)`` on a PIL image: bilinear (PIL's, which averages
    when shrinking), not bicubic."""
    raw = CropDataset(workspace / "subset" / "shards", 40, cache_mb=0)[5]  # the crops are 40 px
    want = Image.fromarray(raw.permute(1, 2, 0).numpy()).resize((24, 24), Image.BILINEAR)
    got = CropDataset(workspace / "subset" / "shards", 24, cache_mb=0)[5]
    assert torch.equal(got, torch.from_numpy(np.array(want)).permute(2, 0, 1))


def test_epoch_view_order_ranks_and_workers(workspace: Path) -> None:
    crops = CropDataset(workspace / "subset" / "shards", 32, cache_mb=64)
    assert len(crops) == 96 and crops[0].shape == (3, 32, 32) and crops[0].dtype == torch.uint8
    on_disk = CropDataset(workspace / "subset" / "shards", 32, cache_mb=0)
    assert on_disk.cache is None and torch.equal(on_disk[17], crops[17])
    assert steps_per_epoch(96, 8, 2, 2) == 3

    def indices(seed: int, epoch: int, rank: int, world: int, start: int = 0) -> list[int]:
        return EpochView(crops, seed, epoch, rank, world, 96 // world, start).indices.tolist()

    full = indices(0, 0, 0, 1)
    assert sorted(full) == list(range(96)) and full == indices(0, 0, 0, 1)
    assert full != indices(0, 1, 0, 1) and full != indices(1, 0, 0, 1)
    ranks = [indices(0, 0, r, 2) for r in range(2)]
    assert not set(ranks[0]) & set(ranks[1]) and len(ranks[0]) == len(ranks[1]) == 48
    assert indices(0, 0, 1, 2, start=10) == ranks[1][10:]
    # the flip of a crop depends on (seed, epoch, crop), not on the rank split or the position
    view1, view2 = EpochView(crops, 0, 0, 0, 1, 96, 0), EpochView(crops, 0, 0, 1, 2, 48, 5)
    i = view2.indices[0]
    assert torch.equal(view1[view1.indices.tolist().index(i)], view2[0])
    flipped = [k for k in range(96) if view1.flips[k]]
    assert 20 < len(flipped) < 76
    serial = list(DataLoader(view2, batch_size=8))
    parallel = list(DataLoader(view2, batch_size=8, num_workers=2))
    assert all(torch.equal(a, b) for a, b in zip(serial, parallel, strict=True))


def test_epoch_view_drops_the_tail_and_draws_new_flips_each_epoch() -> None:
    """A rank reads ``length`` samples of its slice (whole steps; 97 crops over 2 ranks leave one over),
    and the flips are drawn anew each epoch, as the order is, not fixed per crop for the whole run."""
    crops: Any = [torch.zeros(3, 2, 2, dtype=torch.uint8)] * 97
    views = [EpochView(crops, 0, 0, rank, 2, 40, 8) for rank in range(2)]
    assert [len(v) for v in views] == [32, 32]
    epochs = [EpochView(crops, 0, epoch, 0, 1, 96, 0) for epoch in range(2)]
    assert not np.array_equal(epochs[0].flips, epochs[1].flips)


def test_seed_and_epoch_each_key_the_order_and_the_flips() -> None:
    """The order is drawn from ``(seed, epoch)`` and the flips from ``(seed, epoch, crop)``: a key that
    summed seed and epoch gave seed 1's first epoch seed 0's second epoch, and flips keyed without the seed
    were the same in runs of every seed."""
    crops: Any = [torch.zeros(3, 2, 2, dtype=torch.uint8)] * 64

    def view(seed: int, epoch: int) -> EpochView:
        return EpochView(crops, seed, epoch, 0, 1, 64, 0)

    assert view(0, 1).indices.tolist() != view(1, 0).indices.tolist()
    assert not np.array_equal(view(0, 0).flips, view(1, 0).flips)


def test_ranks_read_strided_slices_of_the_epochs_permutation() -> None:
    """``DistributedSampler``'s semantics, as the module documents: rank r reads positions r, r + W, ... of
    the one permutation, so the order on W ranks interleaves the order on one; contiguous blocks per rank
    are disjoint and equal too, and passed the other checks."""
    crops: Any = [torch.zeros(3, 2, 2, dtype=torch.uint8)] * 50
    full = EpochView(crops, 3, 2, 0, 1, 50, 0).indices
    for rank in range(3):
        assert EpochView(crops, 3, 2, rank, 3, 16, 0).indices.tolist() == full[rank::3][:16].tolist()


def test_the_crops_are_cached_when_they_fit_in_cache_mb(tmp_path: Path) -> None:
    """``cache_mb`` bounds the decoded cache, ``crops × 3 × S²`` bytes against ``cache_mb`` MiB: counting a
    byte a pixel cached three times the memory asked for, and megabytes of 10⁶ bytes left on disk a subset
    that fits (each access then decodes a JPEG)."""
    jpeg = encode_jpeg(np.full((8, 8, 3), 128, np.uint8))
    write_shards([("c0", jpeg, {})], tmp_path / "one", shard_size=10)
    write_shards([("c0", jpeg, {}), ("c1", jpeg, {})], tmp_path / "two", shard_size=10)
    assert CropDataset(tmp_path / "one", 580, cache_mb=1).cache is not None  # 1,009,200 bytes <= 1 MiB
    assert CropDataset(tmp_path / "two", 512, cache_mb=1).cache is None  # 1,572,864 bytes > 1 MiB
    assert CropDataset(tmp_path / "one", 1024, cache_mb=3).cache is not None  # exactly 3 MiB: it fits


def test_steps_per_epoch_drop_a_partial_accumulation_group() -> None:
    """Each rank's slice in whole optimizer steps, the tail dropped as EpochView drops it: 97 crops on 2
    ranks are 48 a rank, 3 steps of 8 × 2 and none of a rounded-up fourth (whose micro-batches would read
    past the rank's slice)."""
    assert steps_per_epoch(97, 8, 2, 2) == 3
    assert steps_per_epoch(95, 8, 2, 2) == 2  # 47 a rank: 15 crops short of a third step
    assert steps_per_epoch(31, 8, 2, 1) == 1


def test_crops_are_read_in_rgb_order(tmp_path: Path) -> None:
    """§1's ImageNet mean/std are per RGB channel: a crop read as BGR (OpenCV's order) would be normalised
    with the blue statistics in its red channel. A red crop is channel 0, from disk and from the cache."""
    red_crop = encode_jpeg(np.full((8, 8, 3), (255, 0, 0), np.uint8))
    write_shards([("c0", red_crop, {})], tmp_path, shard_size=10)
    for cache_mb in (0, 1):
        red, green, blue = CropDataset(tmp_path, 8, cache_mb=cache_mb)[0].float().flatten(1).mean(dim=1)
        assert red > 240 and green < 15 and blue < 15, (cache_mb, red, green, blue)


def test_rank_zero_alone_shows_the_index_and_decode_bars(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Every rank indexes and decodes the shards: a bar on each would interleave W bars on one terminal,
    so rank 0's alone is shown, as in training."""
    from mcf.data import pretrain_data

    write_shards([("c0", encode_jpeg(np.zeros((8, 8, 3), np.uint8)), {})], tmp_path, shard_size=10)
    monkeypatch.setattr(pretrain_data, "tqdm", functools.partial(pretrain_data.tqdm, disable=False))
    for rank, shown in ((1, False), (0, True)):
        monkeypatch.setattr(pretrain_data, "get_rank", lambda rank=rank: rank)
        CropDataset(tmp_path, 8, cache_mb=1)
        err = capsys.readouterr().err
        assert ("index shards:" in err, "decode crops:" in err) == (shown, shown), (rank, err)


def test_a_crop_that_is_not_square_is_resized_to_the_input_size(tmp_path: Path) -> None:
    """Every crop comes out ``[3, S, S]`` whatever its shape (a foreign shard's): a check of the height
    alone left a crop S high and wider than S at its size, which the cache's stack or the collate refused."""
    write_shards([("c0", encode_jpeg(np.full((32, 40, 3), 90, np.uint8)), {})], tmp_path, shard_size=10)
    assert CropDataset(tmp_path, 32, cache_mb=0)[0].shape == (3, 32, 32)


def test_an_undecodable_crop_read_by_a_worker_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """torch rebuilds a worker's exception from its text, the worker's traceback first: with
    ``num_workers`` (10 in the paper profile) the CLI printed 20 lines of traceback for a damaged crop
    instead of the one line that names its shard."""
    make_workspace(tmp_path, n=32)
    shards = tmp_path / "subset" / "shards"
    samples = [(key, b"no jpeg" if i == 20 else jpeg, meta)
               for i, (key, jpeg, meta) in enumerate(iter_encoded(shard_urls(shards)))]
    shutil.rmtree(shards)
    write_shards(samples, shards, shard_size=40)
    params = write_params(tmp_path, num_workers=2, cache_mb=0, epochs=1, warmup_epochs=0)
    assert cli_main(["pretrain", "--params", str(params)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("mcf pretrain: ") and "\n" not in err and "Traceback" not in err, err
    assert f"crop {samples[20][0]} in {shards / 'crops-000000.tar'}: not a decodable image" in err


def test_a_shard_gone_since_indexing_is_one_line_naming_it(tmp_path: Path) -> None:
    """Crops not cached are read from their shard at each access: a shard removed while training (a
    rerun of the subset stage, a ``dvc checkout``) was a FileNotFoundError, rebuilt by torch from a
    worker's traceback text and left to the CLI as a traceback; it is a StageError naming the shard."""
    make_workspace(tmp_path, n=96)
    shards = tmp_path / "subset" / "shards"
    crops = CropDataset(shards, 32, cache_mb=0)
    gone = shard_urls(shards)[1]
    Path(gone).unlink()
    view = EpochView(crops, 0, 0, 0, 1, 96, 0)
    with pytest.raises(StageError) as err:
        for _ in raised_as_in_workers(DataLoader(view, batch_size=8, num_workers=2)):
            pass
    message = str(err.value)
    assert message.startswith(f"{gone}: ") and "\n" not in message, message
    assert "since the shards were indexed" in message, message


def test_shards_that_hold_no_crop_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A subset whose shards hold no JPEG member (each an empty archive: damaged after its gate read them
    back) was a ValueError traceback from CropDataset; it is exit 1 on one line naming the folder."""
    make_workspace(tmp_path, n=8)
    shards = tmp_path / "subset" / "shards"
    for shard in shard_urls(shards):
        tarfile.open(shard, "w").close()
    params = write_params(tmp_path, epochs=1, warmup_epochs=0)
    assert cli_main(["pretrain", "--params", str(params)]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"mcf pretrain: no .jpg crops in the shards of {shards}"), err
    assert err.count("\n") == 1, err


def test_pretrain_stage_outputs_and_lr_curve(workspace: Path) -> None:
    common, cfg = load("pretrain", write_params(workspace, "run.yaml", accum_steps=2, ckpt_every=4))
    pretrain.main(common, cfg)
    out = Path(cfg.out)
    assert not Path(cfg.resume_dir).exists()  # finished runs leave no resume state
    backbone = load_backbone(out / "backbone")
    assert backbone.embed_dim == 32
    # the scratch baseline is the encoder exactly as pre-training initialised it (same seed, same init)
    start = MCF(cfg.model, load_teacher(f"mcf:{cfg.teacher}", cfg.model.backbone), common.seed).encoder
    init = load_backbone(out / "backbone_init")
    assert all(torch.equal(v, start.state_dict()[k]) for k, v in init.state_dict().items())
    # ... and not where the teacher stage's MAE starts under the same seed
    mae = teacher.build_mae(load("teacher", workspace / "run.yaml")[1], common.seed).encoder
    assert mae.blocks[0].attn.qkv.weight.shape == init.blocks[0].attn.qkv.weight.shape
    assert not torch.equal(mae.blocks[0].attn.qkv.weight, init.blocks[0].attn.qkv.weight)
    assert not torch.equal(init.blocks[0].attn.qkv.weight, backbone.blocks[0].attn.qkv.weight)
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert not any(k.startswith("teacher.") for k in ckpt["model"])
    assert ckpt["backbone"] == dataclasses.asdict(cfg.model.backbone)  # the heads: not in the shapes
    assert {"momentum_encoder.cls_token", "projector.0.weight", "predictor.0.weight"} <= set(ckpt["model"])
    export_backbone(out / "checkpoint.pt", workspace / "exported")  # the model engineer's reader
    exported = load_backbone(workspace / "exported").state_dict()  # every weight: pos_embed is a fixed table
    assert exported.keys() == backbone.state_dict().keys()
    assert all(torch.equal(exported[k], v) for k, v in backbone.state_dict().items())
    # lr = blr × (8 × 2 × 1) / 256, warm-up 1 epoch (6 steps of 16 crops), then the half-cosine
    plots = Path(cfg.live) / "plots" / "metrics" / "train"
    total, warmup, peak = 12, 6, 1.5e-4 * 16 / 256
    assert tsv_column(plots / "lr.tsv", "step") == list(range(1, total + 1))
    expected = [lr_at(s, total, warmup, peak) for s in range(total)]
    assert tsv_column(plots / "lr.tsv", "lr") == pytest.approx(expected)
    assert set(tsv_column(plots / "momentum.tsv", "momentum")) == {0.99}
    assert not (out / "live").exists()  # the curves sit at the committed metrics path only
    metrics = json.loads((Path(cfg.live) / "metrics.json").read_text())
    assert metrics["step"] == total and math.isfinite(metrics["train"]["loss_feature"])


def test_a_warm_up_of_a_fraction_of_a_step_follows_the_release(workspace: Path) -> None:
    """The release's warm-up is continuous in the epoch (lr = peak × epoch / warmup_epochs): 0.125 of an
    epoch of 12 steps is 1.5 steps, not a step count rounded to 2 (step 1 at peak/1.5, not peak/2)."""
    common, cfg = load("pretrain", write_params(workspace, "frac.yaml", warmup_epochs=0.125))
    pretrain.main(common, cfg)
    total, peak = 24, 1.5e-4 * 8 / 256
    got = tsv_column(Path(cfg.live) / "plots" / "metrics" / "train" / "lr.tsv", "lr")
    assert got[:2] == pytest.approx([0.0, peak / 1.5])
    assert got == pytest.approx([lr_at(s, total, 1.5, peak) for s in range(total)])


def test_nan_guard_names_the_step(workspace: Path) -> None:
    common, cfg = load("pretrain", write_params(workspace, "nan.yaml", blr=1e38, warmup_epochs=0))
    with pytest.raises(StageError, match=r"non-finite loss at step 2 of 24"):
        pretrain.main(common, cfg)
    assert not Path(cfg.out).exists()


def test_weights_that_diverge_under_a_finite_loss_are_neither_checkpointed_nor_exported(
    tmp_path: Path,
) -> None:
    """At blr 1e6 step 2's loss is finite but its update leaves NaN weights: the loss guard fired only
    at step 3, after step 2's checkpoint had replaced step 1's with them (a resume failed at once), and
    at the last step the diverged model was exported as trained."""
    make_workspace(tmp_path, n=32)
    common, cfg = load("pretrain", write_params(tmp_path, "div.yaml", blr=1e6, warmup_epochs=0, epochs=3))
    with pytest.raises(StageError, match=r"non-finite weights after step 2 of 12 \(epoch 1 of 3\)"):
        pretrain.main(common, cfg)
    state = load_checkpoint(cfg.resume_dir, torch.load(Path(cfg.resume_dir) / "last.pt")["run_hash"])
    assert state is not None and state["step"] == 1
    assert all(v.isfinite().all() for v in state["model"].values() if v.is_floating_point())
    assert not Path(cfg.out).exists()
    small = make_workspace(tmp_path / "small", n=16)  # 2 steps: the last one diverges
    common, cfg = load("pretrain", write_params(small, "div.yaml", blr=1e6, warmup_epochs=0, epochs=1))
    with pytest.raises(StageError, match=r"non-finite weights after step 2 of 2 \(epoch 1 of 1\)"):
        pretrain.main(common, cfg)
    assert not Path(cfg.out).exists() and not Path(cfg.live).exists()


def test_a_resume_after_a_change_of_initial_weights_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """pretrain exports backbone_init rebuilt from the seed: a run resumed under code that draws other
    initial weights (same params) would export a start it never trained from, the scratch baseline."""
    make_workspace(tmp_path)
    common, cfg = load("pretrain", write_params(tmp_path, "nan.yaml", blr=1e38, warmup_epochs=0))
    with pytest.raises(StageError, match="non-finite loss at step 2"):
        pretrain.main(common, cfg)  # leaves the checkpoint of step 1
    assert (Path(cfg.resume_dir) / "last.pt").is_file()
    monkeypatch.setattr(mcf_model, "INIT_KEY", mcf_model.INIT_KEY - 7)
    with pytest.raises(StageError, match="other params, data, precision or initial weights"):
        pretrain.main(common, cfg)
    monkeypatch.undo()
    with pytest.raises(StageError, match="non-finite loss at step 2"):  # resumed at step 1
        pretrain.main(common, cfg)


def test_a_resume_under_another_spelling_of_the_same_precision_is_taken(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The run hash holds the autocast dtype the precision resolves to: on the CPU ``auto`` is fp32, so
    naming fp32 computes the same run and resumes it; bf16 computes another and is refused."""
    make_workspace(tmp_path)
    common, cfg = load("pretrain", write_params(tmp_path, "nan.yaml", blr=1e38, warmup_epochs=0))
    with pytest.raises(StageError, match="non-finite loss at step 2"):
        pretrain.main(common, cfg)  # precision auto; leaves the checkpoint of step 1
    precision = {p: dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, precision=p))
                 for p in ("fp32", "bf16")}
    with pytest.raises(StageError, match="other params, data, precision or initial weights"):
        pretrain.main(common, precision["bf16"])
    forwards: list[int] = []
    real = MCF.forward
    monkeypatch.setattr(MCF, "forward", lambda self, *a, **k: forwards.append(1) or real(self, *a, **k))
    with pytest.raises(StageError, match="non-finite loss at step 2"):
        pretrain.main(common, precision["fp32"])
    assert len(forwards) == 1  # resumed at step 1: step 2 alone ran (from scratch, step 1 runs again)


class _Stopped(Exception):
    """A run stopped right after a checkpoint, as a kill there would stop it."""


def test_an_fp16_run_resumes_its_grad_scaler(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Under fp16 the GradScaler backs off from 65536 over the first steps (each overflow skips the
    optimizer step). A resume must go on from the checkpoint's scale and growth tracker: a fresh scaler
    would overflow again, skip steps the uninterrupted run took, and train other weights."""
    make_workspace(tmp_path)
    train = {"epochs": 1, "precision": "fp16"}  # 12 steps, a checkpoint after each
    scalers: dict[str, list[tuple[int, dict[str, Any]]]] = {"straight": [], "stopped": []}
    stop_at: dict[str, int | None] = {"step": None}
    real = Trainer._checkpoint

    def checkpoint(self: Trainer) -> None:
        real(self)
        scalers[Path(self.run.resume_dir).name].append((self.step, self.scaler.state_dict()))
        if self.step == stop_at["step"]:
            raise _Stopped

    monkeypatch.setattr(Trainer, "_checkpoint", checkpoint)
    pretrain.main(*load("pretrain", write_params(tmp_path, "straight.yaml", **train)))
    common, cfg = load("pretrain", write_params(tmp_path, "stopped.yaml", **train))
    stop_at["step"] = 5
    with pytest.raises(_Stopped):
        pretrain.main(common, cfg)
    saved = torch.load(Path(cfg.resume_dir) / "last.pt", weights_only=True)["scaler"]
    assert saved == scalers["straight"][4][1] and saved["scale"] < 65536.0  # backed off before step 5
    stop_at["step"] = None
    pretrain.main(common, cfg)

    assert [s for s, _ in scalers["stopped"]] == list(range(1, 13))
    assert scalers["stopped"] == scalers["straight"]
    a, b = (torch.load(tmp_path / run / "checkpoint.pt", weights_only=True)["model"] for run in scalers)
    assert [k for k in a if not torch.equal(a[k], b[k])] == []


def test_teacher_stage_trains_and_imports(workspace: Path) -> None:
    common, cfg = load("teacher", write_params(workspace, "teach.yaml"))
    teacher.main(common, cfg)
    trained = load_backbone(cfg.out)
    assert json.loads((Path(cfg.out) / "teacher.json").read_text()) == {"source": "train"}
    assert (Path(cfg.out) / "live" / "metrics.json").is_file()
    moco = {f"module.base_encoder.{k}": v for k, v in trained.state_dict().items()}
    moco["module.base_encoder.head.weight"] = torch.zeros(4, 32)  # MoCo's projector head, dropped
    torch.save({"state_dict": moco}, workspace / "moco.pth")
    for spec in (f"mcf:{cfg.out}", f"moco_v3:{workspace / 'moco.pth'}", "random"):
        out = workspace / f"imported-{spec[:3]}"
        teacher.import_teacher(spec, cfg.backbone, out)
        reloaded = load_backbone(out)
        same = torch.equal(reloaded.blocks[0].attn.qkv.weight, trained.blocks[0].attn.qkv.weight)
        assert same == (spec != "random")
        assert json.loads((out / "teacher.json").read_text()) == {"source": spec}


@pytest.mark.parametrize(
    ("stage", "edit", "fragment"),
    [
        ("pretrain", {"mask_ratio": 1.0}, "mask_ratio: must be < 1.0"),
        ("teacher", {"teacher": {"source": "dino:w.pth"}}, "teacher.source: teacher spec 'dino:w.pth'"),
        ("teacher", {"teacher": {"source": "timm:vit_small_patch16_224"}}, "teacher.source: teacher spec"),
        ("pretrain", {"pretrain": {"train": {"warmup_epochs": 5}}}, "pretrain.train.warmup_epochs: must be"),
        ("pretrain", {"pretrain": {"model": {"objective": "pixel"}}}, "pretrain.model.objective: must be"),
        ("pretrain", {"pretrain": {"train": {"min_lr": 1e-3}}},
         "pretrain.train.min_lr: 0.001 is above the peak lr 4.6875e-06 (blr 0.00015 × effective batch 8"),
        ("pretrain", {"pretrain": {"train": {"sync_bn": True}}}, "pretrain.train.sync_bn: true needs CUDA"),
        ("pretrain", {"pretrain": {"train": {"effective_batch": 4096}}},
         "effective_batch: 4096 asked, but batch_size 8 × accum_steps 1 × 1 process(es) is 8: accum_steps"),
    ],
)
def test_invalid_params_fail_before_training(
    workspace: Path, tmp_path: Path, stage: str, edit: dict, fragment: str, capsys: pytest.CaptureFixture[str]
) -> None:
    params = yaml.safe_load(write_params(workspace, "bad.yaml").read_text())
    for section in ("teacher", "pretrain"):  # outputs where nothing else writes
        params[section].update(out=str(tmp_path / section), resume_dir=str(tmp_path / "resume"))
    for key, value in edit.items():
        if isinstance(value, dict):
            for sub, v in value.items():
                params[key][sub] = {**params[key][sub], **v} if isinstance(v, dict) else v
        else:
            params[key] = value
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(params))
    assert cli_main([stage, "--params", str(tmp_path / "bad.yaml")]) == 2
    assert fragment in capsys.readouterr().err
    assert [p.name for p in tmp_path.iterdir()] == ["bad.yaml"]


def test_a_full_disk_keeps_the_last_checkpoint(full_disk: Path) -> None:
    """torch says only "unexpected pos" on a short write: it is reported as ENOSPC, which the CLI turns
    into one line, and the previous checkpoint stands."""
    save_checkpoint({"run_hash": "aaaa", "step": 3, "w": torch.ones(4)}, full_disk)
    with pytest.raises(OSError, match="No space left on device") as raised:
        save_checkpoint({"run_hash": "aaaa", "step": 4, "w": torch.ones(1_000_000)}, full_disk)
    assert raised.value.errno == errno.ENOSPC and Path(raised.value.filename).parent == full_disk
    assert [p.name for p in full_disk.iterdir()] == ["last.pt"]
    assert load_checkpoint(full_disk, "aaaa")["step"] == 3


def test_a_full_disk_is_the_file_systems_error_and_other_failures_stay_torchs(
    full_disk: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A save that fills the disk is raised as the file system's ENOSPC (torch says "unexpected pos");
    a RuntimeError with room to spare is torch's own, not a full disk."""
    with pytest.raises(OSError, match="No space left on device"):
        save_tensors({"states": [torch.ones(100_000), (torch.ones(100_000),)]}, full_disk / "x.pt")

    def broken(obj: object, path: Path) -> None:
        Path(path).write_bytes(b"x")
        raise RuntimeError("some torch failure")

    monkeypatch.setattr(torch, "save", broken)
    with pytest.raises(RuntimeError, match="some torch failure"):
        save_tensors({"w": torch.ones(4)}, tmp_path / "x.pt")


def test_a_full_disk_is_found_though_torch_left_its_last_block_part_empty(
    full_disk: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """torch's write can stop inside a block: a probe that fits in the rest of it (a small one, or one
    write returning short and taken as done) would succeed, and the full disk go out as torch's
    "unexpected pos". The probe writes until the file system refuses, naming the file."""
    path = full_disk / "x.pt"
    path.write_bytes(b"x" * 100)  # what torch wrote: the rest of its block is free, and nothing else is
    fd = os.open(full_disk / "filler", os.O_WRONLY | os.O_CREAT)
    try:
        while os.write(fd, bytes(4096)):
            pass
    except OSError as full:
        assert full.errno == errno.ENOSPC
    finally:
        os.close(fd)

    def stopped(obj: object, f: Path) -> None:
        raise RuntimeError("unexpected pos 4224 vs 100")  # torch's words for its short write

    monkeypatch.setattr(torch, "save", stopped)
    with pytest.raises(OSError, match="No space left on device") as err:
        save_tensors({"w": torch.ones(4)}, path)
    assert err.value.errno == errno.ENOSPC and err.value.filename == str(path)


def test_checkpoint_refuses_other_params_and_restores_rng(tmp_path: Path) -> None:
    state = rng_state()
    expected = (torch.rand(3), np.random.rand(2), random.random())
    save_checkpoint({"run_hash": "aaaa", "step": 3, "rng": [state]}, tmp_path)
    with pytest.raises(StageError, match="other params"):
        load_checkpoint(tmp_path, "bbbb")
    loaded = load_checkpoint(tmp_path, "aaaa")
    set_rng_state(loaded["rng"][0])
    assert torch.equal(torch.rand(3), expected[0])
    assert np.array_equal(np.random.rand(2), expected[1])
    assert random.random() == expected[2]
    (tmp_path / "last.pt").write_bytes((tmp_path / "last.pt").read_bytes()[:100])  # cut short
    with pytest.raises(StageError, match=r"last.pt: cannot be read .*cut short.*; delete .* to start over"):
        load_checkpoint(tmp_path, "aaaa")


def test_a_checkpoint_from_before_world_size_was_saved_resumes_and_stale_writes_go(tmp_path: Path) -> None:
    """A checkpoint without ``world_size`` (written before it was saved) is judged by its hash alone, and a
    temporary file a kill left mid-write (a whole checkpoint's size, one per kill) is removed on load."""
    save_checkpoint({"run_hash": "aaaa", "step": 3}, tmp_path)
    stale = tmp_path / ".last.pt.tmp-12345"
    stale.write_bytes(b"half a checkpoint")
    assert load_checkpoint(tmp_path, "aaaa", world_size=2)["step"] == 3
    assert not stale.exists()
    with pytest.raises(StageError, match="other params"):
        load_checkpoint(tmp_path, "bbbb", world_size=2)


def test_a_checkpoint_of_fewer_processes_is_refused_as_one_of_more(tmp_path: Path) -> None:
    """A checkpoint holds its ranks' RNG states and splits of the data: resumed by more processes (a run
    moved to a larger allocation), as by fewer, it is refused, naming both counts."""
    save_checkpoint({"run_hash": "aaaa", "step": 3, "world_size": 1}, tmp_path)
    with pytest.raises(StageError, match="written by 1 processes, this run has 2: resume it with 1"):
        load_checkpoint(tmp_path, "aaaa", world_size=2)


def test_run_hash_is_of_the_identity_not_its_key_order() -> None:
    """A stable digest: the same identity built in another key order (code refactored) is the same run."""
    a = {"seed": 0, "train": {"lr": 1e-4, "epochs": 2}, "data": Path("x")}
    b = {"data": Path("x"), "train": {"epochs": 2, "lr": 1e-4}, "seed": 0}
    assert run_hash(a) == run_hash(b) and run_hash(a) != run_hash({**a, "seed": 1})


def test_weights_digest_is_of_the_trainable_weights() -> None:
    """A frozen part (the teacher, rebuilt from its own stage's output) is not the run's initial weights."""
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Linear(2, 2))
    model[1].requires_grad_(False)
    before = weights_digest(model)
    with torch.no_grad():
        model[1].weight.add_(1.0)
        assert weights_digest(model) == before
        model[0].weight.add_(1.0)
    assert weights_digest(model) != before


def test_weights_digest_names_each_weight() -> None:
    """Code that registers two weights in the other order and hands each the other's initial values
    gives the same bytes in the same order, and loads the checkpoint by name: the names tell it apart."""
    a, b = torch.nn.Module(), torch.nn.Module()
    a.q, a.k = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.zeros(2))
    b.k, b.q = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.zeros(2))
    assert weights_digest(a) != weights_digest(b)


def test_nonfinite_names_float_tensors_with_a_nan_or_an_infinity() -> None:
    state = {"ok": torch.ones(3), "inf": torch.tensor([1.0, -math.inf]), "nan": torch.tensor([math.nan]),
             "step": torch.tensor(7), "half": torch.tensor([math.inf], dtype=torch.float16)}
    assert nonfinite(state) == ["inf", "nan", "half"]


def fake_cuda(monkeypatch: pytest.MonkeyPatch, gpus: int) -> tuple[torch.Generator, ...]:
    """torch.cuda's own RNG functions over ``gpus`` CPU generators standing in for the GPUs' (GPU 0 the
    current one), so a CPU machine runs the CUDA branch of the checkpoint's RNG state."""
    import torch.cuda.random as cuda_random

    generators = tuple(torch.Generator().manual_seed(100 + i) for i in range(gpus))
    for module in (torch.cuda, cuda_random):
        monkeypatch.setattr(module, "is_initialized", lambda: True)
    monkeypatch.setattr(cuda_random, "_lazy_init", lambda: None)
    monkeypatch.setattr(cuda_random, "current_device", lambda: 0)
    monkeypatch.setattr(cuda_random, "device_count", lambda: gpus)
    monkeypatch.setattr(torch.cuda, "default_generators", generators)
    return generators


def test_cuda_rng_resumes_where_fewer_gpus_are_visible(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A process draws on its current GPU alone: a checkpoint written where 2 GPUs were visible resumes
    where 1 is (another allocation, CUDA_VISIBLE_DEVICES), that GPU's stream restored. The run has drawn
    on it before the checkpoint: a fresh process's stream, at its seed, is not the one saved."""
    with monkeypatch.context() as m:
        gpu = fake_cuda(m, gpus=2)[0]
        torch.rand(2, generator=gpu)
        save_checkpoint({"run_hash": "aaaa", "step": 0, "rng": [rng_state()]}, tmp_path)
        expected = torch.rand(3, generator=gpu)
    with monkeypatch.context() as m:
        gpu = fake_cuda(m, gpus=1)[0]
        set_rng_state(load_checkpoint(tmp_path, "aaaa")["rng"][0])
        assert torch.equal(torch.rand(3, generator=gpu), expected)


def test_the_data_manifest_is_part_of_the_run_identity(tmp_path: Path) -> None:
    """tar pads to 10 KiB blocks, so other crops often give shards of the same names and sizes: the
    manifest beside them (crop ids, perceptual hashes, pixel statistics) tells the data apart."""
    a = make_workspace(tmp_path / "a") / "subset"
    b = tmp_path / "b"
    shutil.copytree(a, b)
    assert data_identity(a) == data_identity(b) and data_identity(a)["manifest"] is None
    for root, first in ((a, 0), (b, 1)):
        pd.DataFrame({"crop_id": [f"crop{i:05d}" for i in range(first, first + 96)]}).to_parquet(
            root / "manifest.parquet")
    assert data_identity(a)["shards"] == data_identity(b)["shards"]
    assert data_identity(a) != data_identity(b)


def test_shards_of_the_same_names_but_other_sizes_are_other_data(tmp_path: Path) -> None:
    """Without a manifest beside them the shards' sizes are what tells a re-cut subset (other crops under
    the same shard names) from the data a checkpoint trained on: a resume on it must be refused."""
    for root, size in (("a", 10240), ("b", 20480)):
        (tmp_path / root / "shards").mkdir(parents=True)
        (tmp_path / root / "shards" / "crops-000000.tar").write_bytes(bytes(size))
    assert data_identity(tmp_path / "a") != data_identity(tmp_path / "b")


def test_truncate_live_drops_rows_past_the_checkpoint_and_torn_ones(tmp_path: Path) -> None:
    metrics = tmp_path / "plots" / "metrics"
    (metrics / "train").mkdir(parents=True)
    rows = "".join(f"{1000 + s}\t{s}\t0.{s}\n" for s in range(1, 6))
    (metrics / "train" / "loss.tsv").write_text("timestamp\tstep\tloss\n" + rows + "1006\t6")
    (metrics / "lr.tsv").write_text("")  # created, then the crash
    (metrics / "torn.tsv").write_text("timest")
    (metrics / "momentum.tsv").write_text("step\tmomen")  # the loop's own format, torn after "step"
    (tmp_path / "metrics.json").write_text("")  # the summary, killed while dvclive rewrote it
    truncate_live(tmp_path, 3)
    assert (metrics / "train" / "loss.tsv").read_text().splitlines() == [
        "timestamp\tstep\tloss", "1001\t1\t0.1", "1002\t2\t0.2", "1003\t3\t0.3"]
    assert [p.name for p in metrics.rglob("*.tsv")] == ["loss.tsv"]
    # the torn summary is what dvclive wrote at the last row kept
    assert json.loads((tmp_path / "metrics.json").read_text()) == {"train": {"loss": 0.3}, "step": 3}


def test_numpys_cached_normal_resumes_with_the_rng(tmp_path: Path) -> None:
    """NumPy's legacy normals come in pairs, the second cached in the state (``has_gauss``, ``gauss``): a
    checkpoint that dropped it would draw the next normal afresh, off the uninterrupted run's numbers."""
    np.random.seed(0)
    np.random.standard_normal()  # draws a pair: the second waits in the state
    save_checkpoint({"run_hash": "aaaa", "step": 3, "rng": [rng_state()]}, tmp_path)
    expected = np.random.standard_normal(3)
    np.random.seed(1)
    set_rng_state(load_checkpoint(tmp_path, "aaaa")["rng"][0])
    assert np.array_equal(np.random.standard_normal(3), expected)


def test_a_resume_folder_a_killed_write_left_is_taken_and_the_working_folder_is_not(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run killed while writing its checkpoint leaves ``.last.pt.tmp-<pid>`` beside last.pt and live/:
    the rerun must take the folder as its own, or one kill at the wrong moment stops the run for good;
    anything else in it is refused. With the params file elsewhere the working folder can be empty, and
    ``.`` is refused all the same: the finished run would delete it."""
    folder = tmp_path / "resume"
    (folder / "live").mkdir(parents=True)
    (folder / "last.pt").write_bytes(b"")
    (folder / ".last.pt.tmp-123").write_bytes(b"")
    check_resume_dir(folder, "pretrain.resume_dir")
    (folder / "notes.txt").write_text("mine")
    with pytest.raises(ParamsError, match="holds 'notes.txt', not a run's resume state"):
        check_resume_dir(folder, "pretrain.resume_dir")
    (tmp_path / "empty").mkdir()
    monkeypatch.chdir(tmp_path / "empty")
    with pytest.raises(ParamsError, match="holds the working folder"):
        check_resume_dir(".", "pretrain.resume_dir")


def test_truncate_live_drops_a_row_cut_short_inside_its_step(tmp_path: Path) -> None:
    """A kill while dvclive appended step 12's row can leave ``1012<TAB>1``: a step that reads 1, before
    the checkpoint's. The row has too few fields and goes, or the curve would gain a point at step 1. The
    rows kept end in a newline, so dvclive's next row starts a line of its own."""
    train = tmp_path / "plots" / "metrics" / "train"
    train.mkdir(parents=True)
    (train / "loss.tsv").write_text("timestamp\tstep\tloss\n1001\t1\t0.1\n1002\t2\t0.2\n1012\t1")
    truncate_live(tmp_path, 11)
    assert (train / "loss.tsv").read_text() == "timestamp\tstep\tloss\n1001\t1\t0.1\n1002\t2\t0.2\n"


def test_a_rebuilt_summary_names_the_latest_step_of_any_series(tmp_path: Path) -> None:
    """Series can end at different steps (one logged less often, as a fine-tune's): a torn summary is
    rebuilt at the latest step a kept row holds, as dvclive wrote it, not the step of the file read last."""
    metrics = tmp_path / "plots" / "metrics"
    metrics.mkdir(parents=True)
    (metrics / "a.tsv").write_text("step\ta\n1\t0.1\n2\t0.2\n")
    (metrics / "b.tsv").write_text("step\tb\n1\t0.5\n")
    (tmp_path / "metrics.json").write_text('{"a": 0.')
    truncate_live(tmp_path, 5)
    assert json.loads((tmp_path / "metrics.json").read_text()) == {"a": 0.2, "b": 0.5, "step": 2}


def test_a_summary_torn_after_the_last_checkpoint_is_published_whole(
    workspace: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """dvclive's ``end`` rewrites ``metrics.json`` after the last checkpoint; a run killed there resumes
    at its last step, logs nothing more, and published ``{"step": 0}`` as the DVC metrics file."""
    from dvclive import Live

    straight = load("pretrain", write_params(workspace, "summary_straight.yaml", epochs=1))
    pretrain.main(*straight)
    end = Live.end

    def killed(live: Live) -> None:
        Path(live.metrics_file).write_text('{\n    "train": {\n        "lo')
        raise KeyboardInterrupt

    monkeypatch.setattr(Live, "end", killed)
    common, cfg = load("pretrain", write_params(workspace, "summary_torn.yaml", epochs=1))
    with pytest.raises(KeyboardInterrupt):
        pretrain.main(common, cfg)
    monkeypatch.setattr(Live, "end", end)
    pretrain.main(common, cfg)  # resumes at its last step
    want = json.loads((Path(straight[1].live) / "metrics.json").read_text())
    assert json.loads((Path(cfg.live) / "metrics.json").read_text()) == want
    assert want["step"] == 12 and set(want["train"]) == {"loss", "loss_contrastive", "loss_feature", "lr",
                                                         "momentum"}


KILLED_CUTTING_BACK = """
import os, signal, sys
from pathlib import Path
from mcf import io
from mcf.train.checkpoint import truncate_live

def killed(path):  # the new rows are written beside loss.tsv, not yet renamed over it
    os.kill(os.getpid(), signal.SIGKILL)

io._fsync = killed
truncate_live(Path(sys.argv[1]), 2)
"""


def test_a_run_killed_cutting_back_its_curves_leaves_no_temporary_file_in_them(tmp_path: Path) -> None:
    """The resume folder's curves are copied whole into the committed dvclive folder: a temporary file
    that a run killed in :func:`truncate_live` left there would become a plot DVC cannot read (``dvc plots
    show`` fails on it) and a file in the output's hash that no clone has."""
    train = tmp_path / "plots" / "metrics" / "train"
    train.mkdir(parents=True)
    (train / "loss.tsv").write_text("step\tloss\n1\t0.1\n2\t0.2\n3\t0.3\n")
    killed = subprocess.run([sys.executable, "-c", KILLED_CUTTING_BACK, str(tmp_path)], env=os.environ)
    assert killed.returncode == -signal.SIGKILL
    assert len(list(train.iterdir())) == 2  # loss.tsv and the killed run's temporary file
    truncate_live(tmp_path, 2)  # the rerun resumes from the same checkpoint
    assert [p.name for p in train.iterdir()] == ["loss.tsv"]
    assert tsv_column(train / "loss.tsv", "step") == [1, 2]


@pytest.mark.parametrize(
    "switches",
    [{}, {"contrastive": False}, {"feature_loss": False}, {"objective": "pixel_mae"}],
)
def test_every_trainable_parameter_gets_a_gradient(switches: dict) -> None:
    """DDP runs with ``find_unused_parameters=False``: an unused trainable weight would hang it."""
    cfg = MCFConfig(
        backbone=BackboneConfig(**TINY), decoder_dim=16, decoder_depth=1, decoder_heads=2,
        feature_layers=(0, 1), proj_hidden=32, proj_dim=16, pred_hidden=32, **switches,
    )
    teacher = FeatureTeacher(create_backbone(BackboneConfig(**TINY))) if cfg.uses_teacher else None
    model = MCF(cfg, teacher)
    model(torch.randn(4, 3, 32, 32), 0.75)["loss"].backward()
    unused = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert unused == []


def test_each_micro_batch_steps_the_momentum_encoder_and_tokens_are_decayed() -> None:
    """The release updates the momentum encoder in every forward, so 8 accumulation steps make 8
    updates per optimizer step; and, like MAE, it decays every weight but norms and biases."""
    cfg = MCFConfig(
        backbone=BackboneConfig(**TINY), decoder_dim=16, decoder_depth=1, decoder_heads=2,
        feature_layers=(0, 1), proj_hidden=32, proj_dim=16, pred_hidden=32,
    )
    torch.manual_seed(0)
    model = MCF(cfg, FeatureTeacher(create_backbone(BackboneConfig(**TINY))))
    with torch.no_grad():
        for p in [*model.encoder.parameters(), *model.projector.parameters()]:
            p.add_(torch.randn_like(p))
    online = [p.clone() for p in [*model.encoder.parameters(), *model.projector.parameters()]]
    momentum = [*model.momentum_encoder.parameters(), *model.momentum_projector.parameters()]
    before = [p.clone() for p in momentum]
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    batches = [torch.randn(4, 3, 32, 32) for _ in range(3)]
    accumulate(model, model, batches, 0.75, 0.9, torch.float32, scaler)
    for o, b, a in zip(online, before, momentum, strict=True):
        torch.testing.assert_close(a, o + 0.9**3 * (b - o))  # three lerps towards unchanged weights

    names = {id(p): n for n, p in model.named_parameters()}
    decay, no_decay = ({names[id(p)] for p in group["params"]} for group in param_groups(model, 0.05))
    assert {"encoder.cls_token", "mask_token", "encoder.blocks.0.attn.qkv.weight"} <= decay
    assert {"encoder.norm.weight", "decoder_pred.bias"} <= no_decay
    assert len(decay | no_decay) == sum(p.requires_grad for p in model.parameters())


class _Linear(torch.nn.Module):
    """The loop's model contract at its smallest: a per-image mean loss, and a momentum hook."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor([0.5, -1.0, 2.0]))

    def forward(self, imgs: torch.Tensor, mask_ratio: float) -> dict[str, torch.Tensor]:
        per_image = (imgs.flatten(1)[:, :3] * self.w).sum(1) ** 2
        return {"loss": per_image.mean(), "loss_twice": 2 * per_image.mean()}

    def update_momentum(self, m: float) -> None:
        pass


def test_accumulated_micro_batches_act_as_one_batch() -> None:
    """``accum_steps`` micro-batches give the gradient and loss terms of one batch of all their images:
    each micro-batch's loss is divided by their number (the effective batch, PROTOCOL §1)."""
    images = torch.randn(8, 3, 2, 2)
    whole, split = _Linear(), _Linear()
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    one = accumulate(whole, whole, [images], 0.75, 0.9, torch.float32, scaler)
    two = accumulate(split, split, list(images.chunk(4)), 0.75, 0.9, torch.float32, scaler)
    torch.testing.assert_close(split.w.grad, whole.w.grad)
    assert two.keys() == one.keys() == {"loss", "loss_twice"}
    for k in one:
        torch.testing.assert_close(two[k], one[k])


class _CosineRamp(_Linear):
    """``_Linear`` with MCF's cosine momentum ramp (0.99 → 1), recording each momentum it is handed."""

    momentum_at = MCF.momentum_at

    def __init__(self) -> None:
        super().__init__()
        self.cfg = MCFConfig(momentum_schedule="cosine")
        self.handed: list[float] = []

    def update_momentum(self, m: float) -> None:
        self.handed.append(m)


def test_optimizer_step_k_uses_and_logs_the_lr_and_momentum_of_step_k(
    workspace: Path, tmp_path: Path
) -> None:
    """The loop's step k (from 0) trains with ``momentum_at(k, total)``: the first step at the schedule's
    start m, not one step into the ramp; every micro-batch of the step gets it, and the curve logs it.
    The optimizer steps with ``lr_at(k)``, the lr the curve logs (0 at the first warm-up step, as the
    release's), not the one before it: every group, as each holds it when ``optimizer.step`` runs."""
    model = _CosineRamp()
    cfg = TrainConfig(epochs=2, warmup_epochs=1, batch_size=8, accum_steps=2, log_every=1)
    run = Run(seed=0, mask_ratio=0.75, resume_dir=tmp_path / "resume", identity={})
    trainer = Trainer(model, CropDataset(workspace / "subset" / "shards", 32, cache_mb=64), cfg, run)
    applied: list[list[float]] = []
    trainer.optimizer.register_step_pre_hook(
        lambda opt, args, kwargs: applied.append([g["lr"] for g in opt.param_groups])
    )
    trainer.fit()
    total = 12  # 96 crops / (8 × 2) = 6 steps an epoch
    expected = [model.momentum_at(k, total) for k in range(total)]
    assert expected[0] == 0.99 and expected[-1] > expected[0]
    assert model.handed == [m for m in expected for _ in range(2)]
    plots = tmp_path / "resume" / "live" / "plots" / "metrics" / "train"
    assert tsv_column(plots / "momentum.tsv", "momentum") == pytest.approx(expected)
    lrs = [lr_at(k, total, 6, scaled_lr(cfg.blr, 16)) for k in range(total)]
    assert lrs[0] == 0.0 and len(applied) == total
    assert applied == [pytest.approx([lr, lr]) for lr in lrs]
    assert tsv_column(plots / "lr.tsv", "lr") == pytest.approx(lrs)


def test_train_config_takes_its_edges_and_refuses_past_them() -> None:
    """The recipe's checks draw these lines: a warm-up as long as the run, and a min_lr equal to the peak
    lr (a constant lr), are valid; a beta of 1 (an average that never moves) is not, and neither is a
    run whose processes reach a larger batch than ``effective_batch`` asks (another recipe, as a smaller
    one is)."""
    TrainConfig(epochs=2, warmup_epochs=2)
    TrainConfig(batch_size=256, blr=1.5e-4, min_lr=1.5e-4, effective_batch=256)
    with pytest.raises(ParamsError, match=r"each must be in \[0, 1\), got \[0.9, 1.0\]"):
        TrainConfig(betas=(0.9, 1.0))
    cfg = TrainConfig(batch_size=8, effective_batch=16)
    cfg.check_processes(2)
    with pytest.raises(ParamsError, match=r"16 asked, .* is 8: accum_steps: 2 reaches it with 1 process"):
        cfg.check_processes(1)
    with pytest.raises(ParamsError, match=r"16 asked, .* is 32: pick a batch_size and accum_steps"):
        cfg.check_processes(4)


def test_the_run_identity_holds_what_changes_the_computation() -> None:
    """The run hash guards a resume: a field left out of it (min_lr, say) would let a run resume under
    another recipe, and one put in (ckpt_every, how often it saves) would refuse a resume that computes
    the same run. Precision joins as the dtype it resolves to (the Trainer's hash)."""
    assert set(TrainConfig().identity()) == {
        "epochs", "warmup_epochs", "batch_size", "accum_steps", "blr", "min_lr", "weight_decay", "betas",
        "sync_bn",
    }


def test_the_last_step_is_logged_and_checkpointed_off_the_intervals(workspace: Path, tmp_path: Path) -> None:
    """12 steps at log_every and ckpt_every 5: rows at 5, 10 and 12, and the checkpoint of step 12, though
    5 does not divide it. Without them the curves and metrics.json end at step 10, and a run killed while
    exporting resumes from step 10 and trains two steps again. An fp32 run scales no loss (its scaler
    state is empty): a scaler would silently skip the steps whose gradients overflow."""
    cfg = TrainConfig(epochs=1, warmup_epochs=0, batch_size=8, ckpt_every=5, log_every=5)
    run = Run(seed=0, mask_ratio=0.75, resume_dir=tmp_path, identity={})
    Trainer(_CosineRamp(), CropDataset(workspace / "subset" / "shards", 32, cache_mb=64), cfg, run).fit()
    assert tsv_column(tmp_path / "live" / "plots" / "metrics" / "train" / "lr.tsv", "step") == [5, 10, 12]
    state = torch.load(tmp_path / "last.pt", weights_only=True)
    assert (state["step"], state["epoch"], state["index"]) == (12, 1, 0)
    assert state["scaler"] == {}


def test_a_checkpoint_that_fits_neither_the_model_nor_its_step_is_refused(
    workspace: Path, tmp_path: Path
) -> None:
    """The model loads non-strictly (the frozen teacher is left out): a checkpoint lacking a weight would
    resume with that weight as initialised. A data position other than its step's would train on other
    crops than the uninterrupted run. Both are refused, naming what is wrong; the checkpoint as written
    resumes."""
    crops = CropDataset(workspace / "subset" / "shards", 32, cache_mb=64)
    cfg = TrainConfig(epochs=1, warmup_epochs=0, batch_size=8, ckpt_every=5)
    run = Run(seed=0, mask_ratio=0.75, resume_dir=tmp_path, identity={})
    Trainer(_CosineRamp(), crops, cfg, run).fit()
    state = torch.load(tmp_path / "last.pt", weights_only=True)
    save_checkpoint({**state, "model": {}}, tmp_path)
    with pytest.raises(StageError, match=r"does not fit the model: missing \['w'\], unexpected \[\]"):
        Trainer(_CosineRamp(), crops, cfg, run)
    save_checkpoint({**state, "index": 1}, tmp_path)
    with pytest.raises(StageError, match=r"data position \(1, 1\) != step 12"):
        Trainer(_CosineRamp(), crops, cfg, run)
    save_checkpoint(state, tmp_path)
    assert Trainer(_CosineRamp(), crops, cfg, run).step == 12


def test_a_micro_batchs_keys_come_from_the_momentum_encoder_it_has_just_stepped() -> None:
    """The release steps the momentum encoder in its forward, before it encodes the keys: each
    micro-batch's keys come from the encoder after that micro-batch's update, not the one before it."""
    cfg = MCFConfig(
        backbone=BackboneConfig(**TINY), feature_loss=False, proj_hidden=32, proj_dim=16, pred_hidden=32,
    )
    torch.manual_seed(0)
    model = MCF(cfg)
    with torch.no_grad():
        for p in [*model.encoder.parameters(), *model.projector.parameters()]:
            p.add_(torch.randn_like(p))
    stepped = copy.deepcopy(model)
    stepped.update_momentum(0.5)
    imgs = torch.randn(4, 3, 32, 32)
    torch.manual_seed(1)
    expected = stepped(imgs, 0.75)["loss_contrastive"]
    torch.manual_seed(1)  # the same masks
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    terms = accumulate(model, model, [imgs], 0.75, 0.5, torch.float32, scaler)
    torch.testing.assert_close(terms["loss_contrastive"], expected)


def test_equal_weights_export_to_equal_bytes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """DVC skips a stage whose deps hash the same: an unchanged backbone_init must not rerun scratch."""
    torch.manual_seed(0)
    cfg = BackboneConfig(**TINY)
    model = create_backbone(cfg)
    for pid, name in ((101, "a"), (202, "b")):  # two runs: their temporary files differ by process id
        monkeypatch.setattr("os.getpid", lambda pid=pid: pid)
        save_backbone(model, cfg, tmp_path / name)
    assert (tmp_path / "a" / "backbone.pth").read_bytes() == (tmp_path / "b" / "backbone.pth").read_bytes()


def test_compiled_step_trains_as_eager(workspace: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``train.compile``: the eager run's masks and losses (inductor rounds differently: 1e-7 measured;
    its own random numbers would draw other masks, 0.2 % off at step 1), and checkpoints in the eager
    model's key layout, so a compiled run resumes or exports like any other. The compiled module must be
    the one that steps: a run that ignored ``compile`` would match the eager run trivially."""
    from mcf.train import loop

    compiled: list[torch.nn.Module] = []
    steps: list[int] = []
    real = loop.compile_model

    def spied(net: torch.nn.Module) -> torch.nn.Module:  # the real compile, watched
        out = real(net)
        assert out is not net
        out.register_forward_pre_hook(lambda *_: steps.append(1))
        compiled.append(out)
        return out

    monkeypatch.setattr(loop, "compile_model", spied)
    runs = {}
    for compile_ in (False, True):
        name = f"compile-{str(compile_).lower()}.yaml"
        common, cfg = load("pretrain", write_params(workspace, name, epochs=1, compile=compile_))
        pretrain.main(common, cfg)
        assert len(compiled) == int(compile_)  # compiled only when asked
        plots = Path(cfg.live) / "plots" / "metrics" / "train"
        runs[compile_] = tsv_column(plots / "loss.tsv", "loss")
        keys = set(torch.load(Path(cfg.out) / "checkpoint.pt", weights_only=True)["model"])
        assert not any("_orig_mod" in k for k in keys)
        assert "encoder.cls_token" in keys
    assert len(runs[True]) == 12 and len(compiled) == 1 and len(steps) >= 12
    assert runs[True] == pytest.approx(runs[False], rel=1e-5)


def test_the_teacher_config_is_part_of_the_run_identity(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A seeded random teacher's weights do not depend on its head count: two such exports differ only
    in backbone.json, and a resume must not take one for the other."""
    make_workspace(tmp_path)
    identities = []
    monkeypatch.setattr(pretrain, "train_and_export", lambda build, data, cfg, run, *a: identities.append(
        run.identity))
    common, cfg = load("pretrain", write_params(tmp_path))
    for heads in (2, 4):
        torch.manual_seed(0)
        size = BackboneConfig(**{**TINY, "num_heads": heads})
        save_backbone(create_backbone(size), size, tmp_path / f"heads{heads}")
        pretrain.main(common, dataclasses.replace(cfg, teacher=str(tmp_path / f"heads{heads}")))
    pth = [(tmp_path / f"heads{h}" / "backbone.pth").read_bytes() for h in (2, 4)]
    assert pth[0] == pth[1] and identities[0] != identities[1]


def test_the_pretrain_run_identity_holds_the_stage_seed_ratio_model_recipe_and_only_a_read_teacher(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The run hash guards a resume: left out of it, the seed, the mask ratio or a model field would let a
    run go on from weights that other settings trained; a run that reads no teacher must not be refused
    because the teacher export changed, and the stage name keeps teacher's checkpoints apart."""
    make_workspace(tmp_path, n=16)
    identities: list[dict[str, Any]] = []
    monkeypatch.setattr(pretrain, "train_and_export", lambda build, data, cfg, run, *a: identities.append(
        run.identity))
    common, cfg = load("pretrain", write_params(tmp_path))
    pretrain.main(common, cfg)
    pretrain.main(common, dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, feature_loss=False)))
    assert identities[0] == {
        "stage": "pretrain", "seed": common.seed, "mask_ratio": common.mask_ratio,
        "model": dataclasses.asdict(cfg.model), "train": cfg.train.identity(),
        "teacher": pretrain.teacher_identity(cfg.teacher),
    }
    assert "teacher" not in identities[1] and identities[1]["model"]["feature_loss"] is False


def inputs_in_place(root: Path) -> tuple[Common, pretrain.PretrainConfig]:
    """The params of :func:`write_params`, with the files pretrain's input checks look for (the subset's
    shards/ folder, the teacher's backbone.pth) present but empty: for tests that stop before training."""
    (root / "subset" / "shards").mkdir(parents=True)
    (root / "teacher").mkdir()
    (root / "teacher" / "backbone.pth").touch()
    return load("pretrain", write_params(root))


def test_pretrain_checks_its_inputs_and_resume_folder_before_it_starts(tmp_path: Path) -> None:
    """`mcf` runs check_inputs before torchrun starts: a data folder without the subset's shards/, or a
    teacher folder without its export, would fail in every worker only after they started, and a
    resume_dir holding other files would be deleted with them when the run finishes."""
    cfg = inputs_in_place(tmp_path)[1]
    pretrain.check_inputs(cfg)
    (tmp_path / "outputs").mkdir()
    (tmp_path / "outputs" / "keep.txt").touch()
    refusals = {
        "pretrain.resume_dir: ": dataclasses.replace(cfg, resume_dir=str(tmp_path / "outputs")),
        "(run `mcf subset` first)": dataclasses.replace(cfg, data=str(tmp_path)),
        "(run `mcf teacher` first)": dataclasses.replace(cfg, teacher=str(tmp_path / "subset")),
    }
    for fragment, bad in refusals.items():
        with pytest.raises(ParamsError, match=re.escape(fragment)):
            pretrain.check_inputs(bad)


def test_pretrain_refuses_a_mask_ratio_that_leaves_no_patch_visible_though_not_loaded_with_load(
    tmp_path: Path,
) -> None:
    """A caller that builds Common itself skips mcf.params.load's check: main checks the ratio against
    the model's size again, so 0.99 on a 16-patch image is a params error before any crop is read, not a
    model that trains on nothing."""
    cfg = inputs_in_place(tmp_path)[1]
    with pytest.raises(ParamsError, match="mask_ratio: 0.99 hides all 16 patches"):
        pretrain.main(Common(seed=0, mask_ratio=0.99), cfg)


def test_pretrain_refuses_an_out_folder_without_its_checkpoint_though_it_holds_a_backbone(
    tmp_path: Path,
) -> None:
    """Only a folder holding checkpoint.pt, which every pretrain output holds, is an earlier output to
    replace: a mistyped out naming a folder of another writer's backbone/ and notes must not be deleted."""
    common, cfg = inputs_in_place(tmp_path)
    (tmp_path / "mine" / "backbone").mkdir(parents=True)
    (tmp_path / "mine" / "backbone" / "backbone.pth").touch()
    (tmp_path / "mine" / "notes.txt").touch()
    with pytest.raises(StageError, match="mine"):
        pretrain.main(common, dataclasses.replace(cfg, out=str(tmp_path / "mine")))
    assert (tmp_path / "mine" / "notes.txt").is_file()


@pytest.mark.parametrize("key", ["out", "live"])
def test_pretrain_refuses_an_out_or_live_folder_under_a_file_before_training(
    tmp_path: Path, key: str
) -> None:
    """``out: notes.txt/pretrain`` can never be made, but only the rename after the last step found it:
    the whole pre-training ran first. Refused before any crop is read, naming the path and the file."""
    common, cfg = inputs_in_place(tmp_path)
    mine = tmp_path / "notes.txt"
    mine.write_text("mine")
    bad = dataclasses.replace(cfg, **{key: str(mine / "pretrain")})
    with pytest.raises(StageError, match=f"cannot write {mine / 'pretrain'}: {mine} is a file"):
        pretrain.main(common, bad)
    assert mine.read_text() == "mine"


def test_the_default_paths_chain_the_stages_and_keep_resume_state_outside_their_outputs() -> None:
    """pretrain reads what subset and teacher write; DVC deletes a stage's outputs before it runs it, so
    a resume folder inside them would lose a killed run's checkpoint."""
    pre, teach = pretrain.PretrainConfig(), teacher.TeacherConfig()
    assert (pre.data, pre.teacher) == (teach.data, teach.out)
    for cfg in (pre, teach):
        assert not Path(cfg.resume_dir).is_relative_to(cfg.out) and cfg.resume_dir.startswith("outputs/")


def test_each_stage_masks_at_its_own_ratio(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The top-level mask_ratio is pretrain's, for the online and the key masks alike; the teacher's MAE
    masks at teacher.mask_ratio (dvc.yaml: `-S mask_ratio=0.6` reruns pretrain, not teacher)."""
    root = make_workspace(tmp_path, n=16)
    params = yaml.safe_load(write_params(root, epochs=1, warmup_epochs=0).read_text())
    params["mask_ratio"] = 0.5
    params["teacher"]["mask_ratio"] = 0.625
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    seen: list[float] = []
    masking = MCF.random_masking
    monkeypatch.setattr(MCF, "random_masking", lambda self, x, ratio, noise=None: (
        seen.append(ratio), masking(self, x, ratio, noise))[1])
    assert cli_main(["teacher", "--params", str(root / "params.yaml")]) == 0
    assert seen and set(seen) == {0.625}
    seen.clear()
    assert cli_main(["pretrain", "--params", str(root / "params.yaml")]) == 0
    assert len(seen) == 4 and set(seen) == {0.5}  # 2 steps of batch 8, an online and a key mask each


DECODER = {"decoder_embed", "decoder_blocks", "decoder_norm", "decoder_pred", "decoder_pos_embed",
           "mask_token"}
CONTRASTIVE = {"projector", "predictor", "momentum_encoder", "momentum_projector"}


@pytest.mark.parametrize(
    ("switches", "terms", "parts"),
    [
        ({"contrastive": False}, {"loss_feature"}, {"encoder", *DECODER}),
        ({"feature_loss": False}, {"loss_contrastive"}, {"encoder", *CONTRASTIVE}),
        ({"objective": "pixel_mae"}, {"loss_pixel"}, {"encoder", *DECODER}),
    ],
)
def test_an_ablation_runs_as_a_stage_and_keeps_the_scratch_baseline(
    tmp_path: Path, switches: dict, terms: set[str], parts: set[str]
) -> None:
    """`mcf pretrain` with each README switch: a run without the feature loss needs no teacher export,
    the checkpoint holds only the parts the objective uses, its curves only its loss terms (and no
    momentum without a momentum encoder), the export loads as a backbone, and backbone_init is the full
    model's (so the @scratch fine-tunes stay cached)."""
    root = make_workspace(tmp_path, n=16)
    full = load("pretrain", write_params(root, "full.yaml"))[1].model
    params = yaml.safe_load(write_params(root, epochs=1, warmup_epochs=0).read_text())
    params["pretrain"]["model"].update(switches)
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    if not dataclasses.replace(full, **switches).uses_teacher:
        shutil.rmtree(root / "teacher")
    assert cli_main(["pretrain", "--params", str(root / "params.yaml")]) == 0
    out = Path(params["pretrain"]["out"])
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert {k.split(".")[0] for k in ckpt["model"]} == parts
    logged = json.loads((Path(params["pretrain"]["live"]) / "metrics.json").read_text())["train"]
    assert {k for k in logged if k.startswith("loss_")} == terms
    curves = {p.stem for p in (Path(params["pretrain"]["live"]) / "plots" / "metrics" / "train").iterdir()}
    assert curves == {"loss", *terms, "lr", *(["momentum"] if "projector" in parts else [])}  # no unused one
    export_backbone(out / "checkpoint.pt", tmp_path / "exported")
    exported, backbone = load_backbone(tmp_path / "exported"), load_backbone(out / "backbone")
    assert torch.equal(exported.blocks[0].attn.qkv.weight, backbone.blocks[0].attn.qkv.weight)
    start = MCF(full, FeatureTeacher(create_backbone(BackboneConfig(**TINY))), 0).encoder.state_dict()
    init = load_backbone(out / "backbone_init").state_dict()
    assert init.keys() == start.keys() and all(torch.equal(v, start[k]) for k, v in init.items())


def test_a_resume_folder_that_is_a_link_is_emptied_not_left(tmp_path: Path) -> None:
    """rmtree refuses a symlink and ignore_errors hid it: a published run's curves stayed in the folder a
    linked resume_dir names (on other storage, say). Its contents go; the link stays, as the user made it."""
    target, link = tmp_path / "scratch", tmp_path / "resume"
    (target / "live" / "plots").mkdir(parents=True)
    (target / "live" / "plots" / "loss.tsv").write_text("step\tloss\n1\t2\n")
    save_checkpoint({"run_hash": "aaaa", "step": 3}, target)
    link.symlink_to(target, target_is_directory=True)
    discard_resume(link)
    assert link.is_symlink() and list(target.iterdir()) == []
    discard_resume(link)  # nothing left, or a dangling link: nothing to do
    target.rmdir()
    discard_resume(link)
    plain = tmp_path / "plain"
    save_checkpoint({"run_hash": "aaaa", "step": 3}, plain)
    discard_resume(plain)
    assert not plain.exists()


def test_a_link_inside_a_linked_resume_folder_is_unlinked_not_followed(tmp_path: Path) -> None:
    """A linked resume folder is emptied entry by entry: a link in it (curves kept on other storage) is
    unlinked and its target left whole; rmtree refuses a link, and its ignore_errors would leave it."""
    elsewhere, target, link = tmp_path / "elsewhere", tmp_path / "scratch", tmp_path / "resume"
    elsewhere.mkdir()
    (elsewhere / "loss.tsv").write_text("step\tloss\n")
    target.mkdir()
    (target / "live").symlink_to(elsewhere, target_is_directory=True)
    link.symlink_to(target, target_is_directory=True)
    discard_resume(link)
    assert list(target.iterdir()) == [] and (elsewhere / "loss.tsv").is_file()
