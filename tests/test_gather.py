"""Keys gathered across ranks: two gloo processes on 127.0.0.1 give the single-process loss."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from mcf.models.backbone import BackboneConfig
from mcf.models.mcf import MCF, MCFConfig
from mcf.train import distributed

WORLD, N, L = 2, 3, 16  # ranks, samples per rank, patches per image
CFG = MCFConfig(
    backbone=BackboneConfig(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2),
    decoder_dim=16, decoder_depth=1, decoder_heads=2, feature_loss=False,
    proj_hidden=32, proj_dim=8, pred_hidden=32,
)


def global_batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Images and both masks' noise for all ranks, the same in every process."""
    g = torch.Generator().manual_seed(1)
    n = WORLD * N
    imgs = torch.randn(n, 3, 32, 32, generator=g)
    return imgs, torch.rand(n, L, generator=g), torch.rand(n, L, generator=g)


def model() -> MCF:
    """Identical weights everywhere; eval mode so the projector BNs do not depend on the batch split."""
    torch.manual_seed(0)
    return MCF(CFG).eval()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank), GLOO_SOCKET_IFNAME="lo")
    torch.set_num_threads(1)
    got_rank, world, _, device = distributed.init_distributed()
    try:
        imgs, noise, key_noise = (t[rank * N:(rank + 1) * N] for t in global_batch())
        net = model()
        with torch.no_grad():
            loss = net(imgs, 0.75, noise, key_noise)["loss_contrastive"]
            latent, _, _ = net.forward_encoder(imgs, 0.75, noise)
            q = net.predictor(net.projector(latent[:, 0]))
            logits, labels = net.contrastive_logits(q, net.momentum_keys(imgs, 0.75, key_noise))
        gathered = distributed.concat_all_gather(torch.full((2,), float(rank)))
        result = {"rank": got_rank, "world": world, "device": str(device), "loss": loss,
                  "logits": logits, "labels": labels, "gathered": gathered}
        torch.save(result, Path(out_dir) / f"rank{rank}.pt")
        distributed.barrier()
    finally:
        distributed.cleanup()


@pytest.mark.timeout(120)
def test_two_ranks_match_one_process(tmp_path: Path) -> None:
    # fork: the ranks inherit the imported modules instead of re-importing torch and timm (seconds each)
    mp.start_processes(_rank_main, args=(free_port(), str(tmp_path)), nprocs=WORLD, start_method="fork")
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]

    imgs, noise, key_noise = global_batch()
    net = model()
    with torch.no_grad():
        single = net(imgs, 0.75, noise, key_noise)["loss_contrastive"]
        latent, _, _ = net.forward_encoder(imgs, 0.75, noise)
        q = net.predictor(net.projector(latent[:, 0]))
        all_logits, _ = net.contrastive_logits(q, net.momentum_keys(imgs, 0.75, key_noise))
    for r, res in enumerate(ranks):
        assert (res["rank"], res["world"], res["device"]) == (r, WORLD, "cpu")
        assert res["gathered"].tolist() == [0.0, 0.0, 1.0, 1.0]
        assert res["logits"].shape == (N, WORLD * N)  # every key of the global batch
        assert res["labels"].tolist() == [r * N + i for i in range(N)]  # positives at offset rank × N
        torch.testing.assert_close(res["logits"], all_logits[r * N:(r + 1) * N], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(sum(res["loss"] for res in ranks) / WORLD, single, rtol=1e-4, atol=1e-6)


def test_single_process_helpers(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    rank, world, local_rank, device = distributed.init_distributed()
    assert (rank, world, local_rank) == (0, 1, 0) and not distributed.is_initialized()
    assert device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    t = torch.arange(3.0, requires_grad=True)
    gathered = distributed.concat_all_gather(t)
    assert torch.equal(gathered, t) and not gathered.requires_grad
    assert distributed.get_rank() == 0 and distributed.get_world_size() == 1
    distributed.barrier()
    distributed.cleanup()


def test_a_stray_rank_or_world_size_alone_is_not_torchrun(monkeypatch: pytest.MonkeyPatch) -> None:
    """torchrun sets both; one alone (another tool's variable left in a shell) must leave the stage one
    process holding its lock, not fail joining a group on the missing other."""
    for present, absent in (("RANK", "WORLD_SIZE"), ("WORLD_SIZE", "RANK")):
        monkeypatch.setenv(present, "1")
        monkeypatch.delenv(absent, raising=False)
        assert not distributed.under_torchrun() and distributed.takes_stage_lock()
        assert distributed.init_distributed()[:3] == (0, 1, 0) and not distributed.is_initialized()
        monkeypatch.delenv(present)


def test_derived_seeds_keep_runs_and_streams_apart() -> None:
    """Neighbouring runs' streams differ: ``seed + key`` gave run 0's rank 1 the masks of run 1's rank 0,
    and run 1's init stream run 0's."""
    keys = (0, 1, 2, distributed.INIT_KEY, distributed.MAE_INIT_KEY)
    assert len({distributed.derive_seed(seed, key) for seed in range(4) for key in keys}) == 4 * len(keys)


def test_each_precision_names_its_autocast_dtype(monkeypatch: pytest.MonkeyPatch) -> None:
    """fp16 is not bf16 (its range overflows where bf16's does not), and a single-process stage runs on
    the GPU where there is one."""
    cpu = torch.device("cpu")
    got = {p: distributed.resolve_dtype(p, cpu) for p in ("auto", "fp32", "bf16", "fp16")}
    assert got == {"auto": torch.float32, "fp32": torch.float32, "bf16": torch.bfloat16,
                   "fp16": torch.float16}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert distributed.default_device() == torch.device("cuda")


def _lone_rank(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1",
                      GLOO_SOCKET_IFNAME="lo")
    os.environ.pop("LOCAL_RANK", None)
    first = distributed.init_distributed()
    again = distributed.init_distributed()
    joined = distributed.is_initialized()
    distributed.cleanup()
    torch.save({"first": first, "again": again, "joined": joined, "left": not distributed.is_initialized()},
               Path(out_dir) / "lone.pt")


@pytest.mark.timeout(60)
def test_joining_twice_is_one_group_and_cleanup_leaves_it(tmp_path: Path) -> None:
    """A process that joins again (a stage calling into another that joins) keeps its group rather than
    failing to initialise it twice; an environment without LOCAL_RANK (torchrun's alone sets it) is local
    rank 0; cleanup leaves the group, which a stage ending in the process must not keep."""
    mp.start_processes(_lone_rank, args=(free_port(), str(tmp_path)), nprocs=1, start_method="fork")
    got = torch.load(tmp_path / "lone.pt", weights_only=True)
    device = torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    assert got["first"] == got["again"] == (0, 1, 0, device)
    assert got["joined"] and got["left"]
