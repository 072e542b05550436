"""``mcf bench pretrain`` on the CPU: the fast path against the eager baseline, the equivalence check,
the loader rate, and an import chain light enough for a GPU machine with only the training stack."""

from __future__ import annotations

import functools
import logging
import shutil
import subprocess
import sys
import time
import weakref
from pathlib import Path

import pytest
import torch
import yaml
from test_pretrain import TINY, make_workspace, write_params
from torch.utils.flop_counter import FlopCounterMode

from mcf.models.backbone import BackboneConfig
from mcf.models.mcf import MCF, MCFConfig
from mcf.models.teacher import load_teacher
from mcf.train import bench
from mcf.train.bench import bench_pretrain, equivalence, loader_rate, make_step, parse, step_flops
from mcf.train.loop import accumulate

PARAMS = Path(__file__).parents[1] / "params.yaml"  # the tiny model of the CPU default


def _model() -> MCF:
    torch.manual_seed(0)
    cfg = MCFConfig(backbone=BackboneConfig(**TINY), decoder_dim=16, decoder_depth=1, decoder_heads=2,
                    feature_layers=(0, 1), proj_hidden=32, proj_dim=16, pred_hidden=32)
    return MCF(cfg, load_teacher("random", BackboneConfig(**TINY))).train()


def test_equivalence_uses_one_set_of_masks_and_catches_a_difference() -> None:
    # batch 8: at 4 this tiny model's contrastive term moves up to 4 % in bf16, depending on the init
    model, imgs = _model(), torch.randn(8, 3, 32, 32)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    ok, pairs = equivalence(model, model, imgs, 0.75, torch.float32, rtol=1e-6)
    assert torch.equal(torch.get_rng_state(), rng)  # the RNG put back: the timed steps draw as without it
    assert ok and all(a == b for a, b in pairs.values())  # the same masks: fp32 against fp32 is exact
    assert {"loss", "loss_feature", "loss_contrastive"} <= pairs.keys()
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())  # BN statistics put back
    ok, pairs = equivalence(model, model, imgs, 0.75, torch.bfloat16, rtol=3e-2)
    assert ok and any(a != b for a, b in pairs.values())  # bf16 differs, within its tolerance
    assert not equivalence(model, model, imgs, 0.75, torch.bfloat16, rtol=1e-9)[0]
    other = _model()
    with torch.no_grad():  # a "fast path" that computes something else: perturbed encoder weights
        for p in other.encoder.parameters():
            p.add_(0.05 * torch.randn_like(p))
    assert not equivalence(model, other, imgs, 0.75, torch.float32, rtol=1e-2)[0]


class _OwnMasks(torch.nn.Module):
    """A "fast path" that computes the step right but draws its masks from a generator of its own (as
    inductor's RNG does without ``fallback_random``)."""

    def __init__(self, model: MCF) -> None:
        super().__init__()
        self.model = model

    def forward(self, imgs: torch.Tensor, mask_ratio: float) -> dict[str, torch.Tensor]:
        own = torch.Generator().manual_seed(1)
        n, length = imgs.shape[0], self.model.grid**2
        noise, key_noise = (torch.rand(n, length, generator=own) for _ in range(2))
        return self.model(imgs, mask_ratio, noise, key_noise)


def test_the_eager_reference_keeps_no_activations_and_the_flops_take_a_slice(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """At the fast path's batch the eager fp32 reference's activations would not fit beside it (ViT-B at
    512: some 80 GiB, past an H100): its forward runs without grad, the fast path's with it, and the FLOPs
    are counted on at most FLOP_BATCH images, the same per image as on the whole batch."""
    from mcf.train import bench

    model, imgs = _model(), torch.randn(8, 3, 32, 32)
    grad = []
    monkeypatch.setattr(MCF, "forward", lambda self, *a, f=MCF.forward, **k: grad.append(
        torch.is_grad_enabled()) or f(self, *a, **k))
    assert equivalence(model, model, imgs, 0.75, torch.float32, rtol=1e-6)[0] and grad == [False, True]
    monkeypatch.undo()

    def per_image(argv: list[str]) -> float:
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="mcf.train.bench"):
            assert bench_pretrain(argv) == 0
        return float(caplog.text.split("step FLOPs: ")[1].split(" GFLOP")[0])

    argv = ["--params", str(PARAMS), "--batch", "8", "--steps", "1", "--warmup", "0", "--baseline", "none"]
    whole = per_image(argv)
    monkeypatch.setattr(bench, "FLOP_BATCH", 2)
    assert per_image(argv) == pytest.approx(whole, rel=1e-3) and "(counted on 2 images)" in caplog.text


def test_equivalence_fails_a_path_that_draws_other_masks() -> None:
    """At batch 32 other masks move every loss term by less than bf16's 3e-2 (the contrastive term by
    about 1 %): only the generators' states after the forward tell the paths apart."""
    model, imgs = _model(), torch.randn(32, 3, 32, 32)
    ok, pairs = equivalence(model, _OwnMasks(model), imgs, 0.75, torch.bfloat16, rtol=3e-2)
    assert all(abs(b - a) <= 3e-2 * abs(a) for a, b in pairs.values())  # the losses alone would pass
    assert not ok


def test_time_steps_times_exactly_the_steps_after_the_warm_up() -> None:
    """The warm-up's steps (compilation, AdamW's first moments) must run but stay off the clock, and the
    clock must cover exactly ``steps`` calls: the rate divides batch x steps by these seconds. A dropped
    warm-up timed cold steps; a clock started before it, or one step short, read a wrong images/s."""
    calls = []

    def step() -> None:
        calls.append(None)
        time.sleep(0.3 if len(calls) <= 2 else 0.02)

    seconds, peak = bench.time_steps(step, torch.device("cpu"), 3, 2)
    assert len(calls) == 5 and peak == 0.0
    assert 0.06 <= seconds < 0.6


def test_the_bench_step_is_the_pretrain_loops_step() -> None:
    """What is timed must be what the loop computes: the momentum update, forward and backward
    (:func:`accumulate`), the AdamW step and clearing the gradients. A step without the momentum update,
    the optimizer step or the ``zero_grad`` (gradients summed over the timed steps) ran fast and wrong."""
    imgs = torch.randn(8, 3, 32, 32)
    timed, ref = _model(), _model()
    step = make_step(timed, timed, imgs, 0.75, torch.float32, torch.optim.AdamW(timed.parameters(), lr=1e-3))
    optimizer = torch.optim.AdamW(ref.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    for seed in range(2):  # the second step sees the first's gradients if they are not cleared
        torch.manual_seed(seed)
        step()
        torch.manual_seed(seed)
        accumulate(ref, ref, [imgs], 0.75, ref.momentum_at(0, 1), torch.float32, scaler)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    assert ref.momentum_at(0, 1) is not None
    assert all(p.grad is None for p in timed.parameters())
    ours, theirs = timed.state_dict(), ref.state_dict()
    assert all(torch.equal(v, theirs[k]) for k, v in ours.items())


def test_the_printed_rates_are_the_timed_seconds_arithmetic(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """images/s is batch x steps over the timed seconds, ms/step those seconds over the steps, TFLOP/s the
    whole batch's step FLOPs (counted on FLOP_BATCH images) times the steps over the seconds, and the
    speed-up fast over baseline: each read from the seconds :func:`time_steps` returned and the FLOPs
    :func:`step_flops` counted. A rate that dropped the step count, or FLOPs of the counted slice alone,
    printed numbers off by that factor."""
    seconds: list[float] = []
    counted: list[int] = []
    timed, count = bench.time_steps, bench.step_flops
    monkeypatch.setattr(bench, "time_steps", lambda *a: seconds.append(timed(*a)[0]) or (seconds[-1], 0.0))
    monkeypatch.setattr(bench, "step_flops", lambda *a: counted.append(count(*a)) or counted[-1])
    monkeypatch.setattr(bench, "FLOP_BATCH", 4)
    with caplog.at_level(logging.INFO, logger="mcf.train.bench"):
        assert bench_pretrain(["--params", str(PARAMS), "--batch", "8", "--steps", "2", "--warmup", "0"]) == 0
    flops = counted[0] / 4 * 8
    for name, s in zip(("fast", "baseline"), seconds, strict=True):
        line = f"{8 * 2 / s:.1f} images/s, {1000 * s / 2:.1f} ms/step, {flops * 2 / s / 1e12:.3g} TFLOP/s"
        assert f"{name} (float32, eager, unfused AdamW): {line}" in caplog.text
    assert f"speed-up over the eager baseline: {seconds[1] / seconds[0]:.2f}x" in caplog.text
    assert "equivalence check: passed (rtol 1e-04)" in caplog.text


class _Compiled(torch.nn.Module):
    """Stands in for ``torch.compile``'s module (a real compile of the tiny step takes minutes here)."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, *args: object) -> dict[str, torch.Tensor]:
        return self.model(*args)


def test_only_the_fast_path_runs_compiled_pinned_and_with_its_teacher_residual(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The equivalence check and the fast path's timing must run the module --compile made, under the
    kernel --attention pins and with the teacher residual --teacher-residual asks; the baseline runs the
    eager model on torch's own kernel. A check on another kernel than the timed one, a baseline timed on
    the pinned kernel, or a fast path timing the eager model compared other steps than it printed."""
    seen: list[tuple[str, object, bool, bool | None]] = []
    flash = torch.backends.cuda.flash_sdp_enabled  # off under the pin: only the efficient and math kernels
    check, new_step, timed = bench.equivalence, bench.make_step, bench.time_steps

    def checked(model: MCF, fast: torch.nn.Module, *args: object) -> tuple[bool, dict]:
        seen.append(("check", fast, flash(), model.teacher.low_precision_residual))
        return check(model, fast, *args)

    def stepped(model: MCF, net: torch.nn.Module, *args: object) -> object:
        seen.append(("step", net, flash(), model.teacher.low_precision_residual))
        return new_step(model, net, *args)

    def clocked(*args: object) -> tuple[float, float]:
        seen.append(("time", None, flash(), None))
        return timed(*args)

    monkeypatch.setattr(bench, "compile_model", _Compiled)
    monkeypatch.setattr(bench, "equivalence", checked)
    monkeypatch.setattr(bench, "make_step", stepped)
    monkeypatch.setattr(bench, "time_steps", clocked)
    argv = ["--params", str(PARAMS), "--batch", "8", "--steps", "1", "--warmup", "0", "--compile",
            "--attention", "efficient", "--teacher-residual", "fp32"]
    with caplog.at_level(logging.INFO, logger="mcf.train.bench"):
        assert bench_pretrain(argv) == 0
    [check_, flops, fast, fast_time, base, base_time] = seen
    assert isinstance(check_[1], _Compiled) and fast[1] is check_[1] and not isinstance(base[1], _Compiled)
    assert flops[1] is base[1]  # the FLOPs are counted on the eager model
    # the FLOPs are counted on math; each step is built before its clock's context
    assert [s[2] for s in seen] == [False, False, True, False, True, True]
    assert check_[3] is fast[3] is False
    how = "float32, compiled, unfused AdamW, efficient attention, teacher residual fp32"
    assert f"fast ({how}):" in caplog.text


def test_step_flops_count_attention_on_the_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """The CPU's fused attention kernel has no FLOP formula: the count must still hold attention's matmuls
    (QK^T and AV, 4·B·H·Lq·Lk·D a forward, three times that with its backward)."""
    model, imgs = _model(), torch.randn(4, 3, 32, 32)
    calls, sdpa = [], torch.nn.functional.scaled_dot_product_attention

    def counting(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *args: object, **kwargs: object
                 ) -> torch.Tensor:
        calls.append(4 * q.shape[:-1].numel() * k.shape[-2] * q.shape[-1] * (3 if q.requires_grad else 1))
        return sdpa(q, k, v, *args, **kwargs)

    def optimizer() -> torch.optim.Optimizer:
        return torch.optim.AdamW(model.parameters(), lr=0.0)

    with FlopCounterMode(display=False) as counter:  # torch's own kernel choice: attention goes uncounted
        make_step(model, model, imgs, 0.75, torch.float32, optimizer())()
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", counting)
    flops = step_flops(model, imgs, 0.75, optimizer())
    assert calls and flops - counter.get_total_flops() == sum(calls)


def test_bench_reports_both_paths_and_the_loader(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    make_workspace(tmp_path, n=40)
    params = write_params(tmp_path)
    argv = ["--params", str(params), "--batch", "8", "--steps", "1", "--warmup", "1", "--precision", "bf16",
            "--shards", str(tmp_path / "subset" / "shards"), "--workers", "1", "--loader-batches", "3"]
    with caplog.at_level(logging.INFO, logger="mcf.train.bench"):
        assert bench_pretrain(argv) == 0
    text = caplog.text
    assert "equivalence check: passed (rtol 3e-02)" in text
    assert "fast (bfloat16, eager, unfused AdamW):" in text
    assert "baseline (float32, eager, unfused AdamW):" in text
    assert "speed-up over the eager baseline:" in text and "GFLOP per image" in text
    assert "data loader (" in text and "images/s" in text
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="mcf.train.bench"):  # a tolerance no bf16 step meets
        assert bench_pretrain([*argv[:10], "--baseline", "none", "--rtol", "1e-12"]) == 1
    assert "equivalence check: FAILED" in caplog.text and "baseline (" not in caplog.text
    caplog.clear()
    pinned = [*argv[:10], "--baseline", "none", "--attention", "efficient", "--profile", "500"]
    with caplog.at_level(logging.INFO, logger="mcf.train.bench"):  # a pinned attention kernel, a profile
        assert bench_pretrain(pinned) == 0
    assert "fast (bfloat16, eager, unfused AdamW, efficient attention):" in caplog.text
    table = caplog.text.split("profile of the fast path, 2 steps:")[1]  # every operator
    # the CPU has no memory-efficient kernel, so the pin leaves math, not torch's own choice (flash)
    assert "_scaled_dot_product_attention_math" in table and "flash_attention" not in table
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="mcf.train.bench"):  # the teacher as plain autocast runs it
        assert bench_pretrain([*argv[:10], "--baseline", "none", "--teacher-residual", "fp32"]) == 0
    assert "fast (bfloat16, eager, unfused AdamW, teacher residual fp32):" in caplog.text
    with pytest.raises(SystemExit):  # checked before any work
        bench_pretrain(["--shards", str(tmp_path / "nowhere")])
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit):  # a usage error, not torch's traceback
            bench_pretrain(["--device", "cuda"])
    with pytest.raises(ValueError, match="fewer than one batch"):
        loader_rate(tmp_path / "subset" / "shards", 32, 64, 0, 1, torch.device("cpu"))


def test_each_timed_path_holds_no_other_optimizers_state(tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """CUDA's peak memory of a path must not count another AdamW's moments (ViT-B's: about 0.9 GiB):
    when either path's clock starts, no optimizer holds state (each one's own fills in its warm-up)."""
    make_workspace(tmp_path, n=8)
    params = write_params(tmp_path)
    made: list[weakref.ref] = []

    class Tracked(torch.optim.AdamW):
        def __init__(self, *args: object, **kwargs: object) -> None:
            super().__init__(*args, **kwargs)
            made.append(weakref.ref(self))

    timed = bench.time_steps
    holding = []

    def checked(*args: object) -> tuple[float, float]:
        holding.append(sum(1 for ref in made if ref() is not None and ref().state))
        return timed(*args)

    monkeypatch.setattr(torch.optim, "AdamW", Tracked)
    monkeypatch.setattr(bench, "time_steps", checked)
    assert bench_pretrain(["--params", str(params), "--batch", "4", "--steps", "1", "--warmup", "1"]) == 0
    assert holding == [0, 0]


@pytest.mark.parametrize("model", [{"contrastive": False}, {"objective": "pixel_mae"}])
def test_the_ablations_without_a_momentum_encoder_run(tmp_path: Path, model: dict[str, object]) -> None:
    """The step took the momentum from the config whatever the model, and ``update_momentum`` reads a number
    as "update the momentum encoder": the contrastive-off and pixel_mae params ended in an AttributeError."""
    params = write_params(tmp_path)
    spec = yaml.safe_load(params.read_text())
    spec["pretrain"]["model"].update(model)
    params.write_text(yaml.safe_dump(spec))
    assert bench_pretrain(["--params", str(params), "--batch", "4", "--steps", "1", "--warmup", "0"]) == 0


class _SlowCrops(torch.utils.data.Dataset):
    """Crops that take ``SLOW`` seconds each to decode, whatever the machine's load (a sleep)."""

    def __len__(self) -> int:
        return 64

    def __getitem__(self, i: int) -> torch.Tensor:
        time.sleep(SLOW)
        return torch.zeros(3, 4, 4)


SLOW = 0.1  # a scheduler delay of a loaded machine (tens of ms per wake-up) stays well inside the bounds


def test_loader_rate_leaves_the_workers_first_burst_out(monkeypatch: pytest.MonkeyPatch) -> None:
    """The workers start together, so their first batches land at once: timed from the first batch, the
    second of 2 workers' came in that burst and the rate read far above what they deliver."""
    monkeypatch.setattr("mcf.train.bench.CropDataset", lambda *args, **kwargs: _SlowCrops())
    monkeypatch.setattr("mcf.train.bench.EpochView", lambda crops, *args: crops)
    rate = loader_rate(Path("shards"), 4, 4, 2, 1, torch.device("cpu"))
    steady = 2 / SLOW  # 2 workers, each an image every SLOW seconds
    assert 0.5 * steady < rate < 1.5 * steady


def test_bench_imports_only_the_training_stack() -> None:
    """The GPU machines have torch and timm, not the pipeline's data and orchestration libraries."""
    heavy = ["dvclive", "dvc", "pandas", "great_expectations", "prefect", "sklearn", "cv2", "pyarrow"]
    code = f"import sys, mcf.cli, mcf.train.bench; print([m for m in {heavy!r} if m in sys.modules])"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "[]", done.stdout + done.stderr


@pytest.mark.parametrize("ratio", ["1.5", "-0.1", "0", "1", "nan", "abc"])
def test_a_mask_ratio_outside_0_1_is_a_usage_error(ratio: str, capsys: pytest.CaptureFixture[str]) -> None:
    """Not a number read "invalid _ratio value": argparse's message names the private type function."""
    with pytest.raises(SystemExit):
        parse(["--mask-ratio", ratio])
    assert f"expected a ratio in (0, 1), got {ratio}" in capsys.readouterr().err


@pytest.mark.parametrize(("model", "ratio", "patches"), [("tiny", "0.95", 16), ("base", "0.995", 196)])
def test_a_mask_ratio_that_hides_every_patch_is_a_usage_error(
    model: str, ratio: str, patches: int, tmp_path: Path, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The pretrain stage refuses it; the bench timed a step whose encoder saw the class token alone. It
    is refused before the model is built (ViT-B and its teacher took 20 s on the CPU to get there)."""
    from mcf.cli import main as cli_main

    def build(*args: object) -> None:
        raise AssertionError("the model was built before the mask ratio was checked")

    monkeypatch.setattr("mcf.train.bench.build", build)
    argv = ["bench", "pretrain", "--model", model, "--params", str(write_params(tmp_path)),
            "--mask-ratio", ratio, "--batch", "4", "--steps", "1", "--warmup", "0", "--baseline", "none"]
    assert cli_main(argv) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert f"--mask-ratio: {ratio} hides all {patches} patches from the encoder of --model {model}" in err


@pytest.mark.parametrize("batch", ["1", "3"])
def test_a_batch_below_four_is_a_usage_error(
    batch: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """At 1 the projector's BatchNorm raised a traceback; at 2 or 3 the equivalence check failed on bf16
    rounding alone (the contrastive term swings). Refused before the model is built."""
    from mcf.cli import main as cli_main

    def build(*args: object) -> None:
        raise AssertionError("the model was built before the batch was checked")

    monkeypatch.setattr("mcf.train.bench.build", build)
    argv = ["bench", "pretrain", "--params", str(write_params(tmp_path)), "--batch", batch, "--steps", "1"]
    assert cli_main(argv) == 2
    assert f"--batch: {batch}: use 4 or more" in " ".join(capsys.readouterr().err.split())


@pytest.mark.parametrize(
    ("flag", "least"),
    [("--steps", 1), ("--warmup", 0), ("--workers", 0), ("--profile", 0), ("--loader-batches", 1)],
)
def test_counts_below_their_least_are_usage_errors(
    flag: str, least: int, capsys: pytest.CaptureFixture[str]
) -> None:
    """A negative --warmup timed cold steps without a word; negative --workers was DataLoader's traceback."""
    with pytest.raises(SystemExit):
        parse([flag, str(least - 1)])
    assert f"{flag} must be at least {least}" in capsys.readouterr().err


@pytest.mark.parametrize("rtol", ["0", "-1e-4", "nan", "inf"])
def test_a_tolerance_not_above_zero_is_a_usage_error(rtol: str, capsys: pytest.CaptureFixture[str]) -> None:
    """The equivalence check passes within ``rtol``: at 0 or below (or NaN) it failed every run, after
    minutes of device time under --compile, as if the fast path computed something else; at inf it
    passed whatever the fast path computed."""
    with pytest.raises(SystemExit):
        parse([f"--rtol={rtol}"])
    assert f"--rtol must be a finite number above 0, got {float(rtol)}" in capsys.readouterr().err
    assert parse(["--rtol", "1e-9"]).rtol == 1e-9


def test_shards_too_few_for_a_batch_are_a_usage_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The loader is timed last: this failed only after the step's figures (minutes of device time under
    --compile), with a ValueError's traceback."""
    make_workspace(tmp_path, n=40)
    with pytest.raises(SystemExit):
        parse(["--shards", str(tmp_path / "subset" / "shards"), "--batch", "64"])
    assert "40 crops are fewer than one batch of 64" in capsys.readouterr().err
    assert parse(["--shards", str(tmp_path / "subset" / "shards"), "--batch", "40"]).batch == 40  # one batch


def test_shards_that_are_not_a_folder_of_shards_say_what_they_are(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A mistyped --shards said 'no crops-*.tar shards there', as if the folder were there but empty."""
    (tmp_path / "a.tar").touch()
    for given, found in (("nowhere", "no such folder"), ("a.tar", "a file, not a folder of shards"),
                         (".", "no crops-*.tar shards in this folder")):
        with pytest.raises(SystemExit):
            parse(["--shards", str(tmp_path / given)])
        assert f"{found} (build some: tools/bench_shards.yaml)" in capsys.readouterr().err


def test_gpu_bench_without_shards_stops_before_any_run(tmp_path: Path) -> None:
    """tools/gpu_bench.sh in a checkout at ``tmp_path``, with stubs of nvidia-smi and python3 that log their
    calls: without the shards it used to go on, the main run stopping at its --shards usage error and b512 and
    control spending the device time."""
    shutil.copytree(Path(__file__).resolve().parents[1] / "tools", tmp_path / "tools")
    stubs, calls = tmp_path / "stubs", tmp_path / "calls"
    stubs.mkdir()
    for name in ("nvidia-smi", "python3"):
        (stubs / name).write_text(f'#!/bin/sh\necho "{name} $*" >> "{calls}"\n')
        (stubs / name).chmod(0o755)
    env = {"PATH": f"{stubs}:/usr/bin:/bin", "OUT": str(tmp_path / "out")}
    run = functools.partial(subprocess.run, ["bash", "tools/gpu_bench.sh"], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=60)
    done = run()
    assert done.returncode == 2 and "tools/bench_shards.yaml" in done.stderr
    assert not calls.exists()
    shards = tmp_path / "outputs/bench/crop/shards"
    shards.mkdir(parents=True)
    (shards / "crops-000000.tar").touch()
    done = run()
    lines = calls.read_text().splitlines()
    assert done.returncode == 0 and len(lines) == 5  # the card, the versions, the three runs
    assert lines[0].startswith("nvidia-smi")
    assert "--shards outputs/bench/crop/shards --workers 14" in lines[2]


def test_the_help_names_every_exit_status(capsys: pytest.CaptureFixture[str]) -> None:
    """A script running the bench tells a failed equivalence check (1) from a usage error (2) by the help."""
    from mcf.cli import main as cli_main

    with pytest.raises(SystemExit) as done:
        cli_main(["bench", "pretrain", "--help"])
    assert done.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "Exit status: 0 the equivalence check passed; 1 it failed" in text
    assert "2 a usage error or params rejected" in text and "130 interrupted" in text
    assert cli_main(["bench", "pretrain", "--params", "missing.yaml"]) == 2  # the params rejected
