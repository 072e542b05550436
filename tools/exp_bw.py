"""One-off device probe (issue 8): HBM bandwidth a copy reaches vs the teacher's compiled GELU kernels."""
import torch
import torch.nn.functional as F


def ms(fn, reps: int = 50) -> float:
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps


x = torch.randn(50432, 3072, device="cuda", dtype=torch.bfloat16)
g = torch.randn_like(x)
y = torch.empty_like(x)
gb = x.numel() * 2 / 1e9
t = ms(lambda: y.copy_(x))
print(f"copy bf16 [50432, 3072]: {t * 1e3:.0f} us, {2 * gb / t:.2f} TB/s")
gelu = torch.compile(lambda a: F.gelu(a))
t = ms(lambda: gelu(x))
print(f"compiled exact GELU: {t * 1e3:.0f} us, {2 * gb / t:.2f} TB/s")
t = ms(lambda: F.gelu(x))
print(f"eager exact GELU: {t * 1e3:.0f} us, {2 * gb / t:.2f} TB/s")
back = torch.compile(lambda a, b: torch.ops.aten.gelu_backward(b, a))
t = ms(lambda: back(x, g))
print(f"compiled GELU backward: {t * 1e3:.0f} us, {3 * gb / t:.2f} TB/s")
