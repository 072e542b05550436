"""One-off device experiment (issue 8): does Inductor's GEMM autotuning with Triton templates (persistent
TMA) and epilogue fusion beat cuBLAS plus separate elementwise kernels on the teacher, and on the step?

  python3 tools/exp_autotune.py teacher default|autotune   # the feature loss alone, fwd + bwd, batch 256
  python3 tools/exp_autotune.py step autotune ARGS...      # mcf bench pretrain with the autotune options
"""
import sys
import time

import torch
import torch._inductor.config as ic

AUTOTUNE = {"max_autotune_gemm": True, "max_autotune_pointwise": False,
            "max_autotune_gemm_backends": "ATEN,TRITON", "epilogue_fusion": True,
            "benchmark_epilogue_fusion": True, "triton.enable_persistent_tma_matmul": True,
            "fallback_random": True}


def options(kind: str) -> dict:
    if kind == "default":
        return {"fallback_random": True}
    if kind == "cdt":
        return {"fallback_random": True, "coordinate_descent_tuning": True}
    have = {k: v for k, v in AUTOTUNE.items() if hasattr(ic.triton if k.startswith("triton.") else ic,
                                                          k.removeprefix("triton."))}
    print("autotune options:", have, "dropped:", sorted(set(AUTOTUNE) - set(have)), flush=True)
    return have


def teacher(kind: str, batch: int = 256, steps: int = 15, warmup: int = 3) -> None:
    from mcf.train.bench import build
    torch.manual_seed(0)
    model = build("base", "params.yaml").cuda().train()
    imgs = torch.randn(batch, 3, 224, 224, device="cuda")
    recon = torch.randn(batch, 3, 224, 224, device="cuda", requires_grad=True)
    f = torch.compile(model.feature_loss, options=options(kind))

    def step() -> torch.Tensor:
        with torch.autocast("cuda", torch.bfloat16):
            loss = f(recon, imgs)
        loss.backward()
        return loss

    t0 = time.perf_counter()
    loss = step()
    torch.cuda.synchronize()
    first = time.perf_counter() - t0
    grad = recon.grad.float()
    print(f"teacher {kind}: compile + first step {first:.0f} s; loss {loss.item():.8g}; grad norm "
          f"{grad.norm().item():.8g}; grad[0,0,0,:3] {grad[0, 0, 0, :3].tolist()}", flush=True)
    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    torch.cuda.synchronize()
    ms = (time.perf_counter() - t0) / steps * 1e3
    print(f"teacher {kind}: {ms:.2f} ms per feature loss (target pass, recon pass, backward), batch {batch}",
          flush=True)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="self_device_time_total", row_limit=22, max_name_column_width=70))


def step(argv: list[str]) -> int:
    import mcf.train.bench as bench
    opts = options("autotune")
    bench.compile_model = lambda net: torch.compile(net, options=opts)
    return bench.bench_pretrain(argv)


if __name__ == "__main__":
    print("torch", torch.__version__, torch.cuda.get_device_name(), flush=True)
    if sys.argv[1] == "teacher":
        teacher(sys.argv[2])
    else:
        sys.exit(step(sys.argv[3:]))
