"""CUDA-event timing shared by the PyTorch sides of the benchmarks (torch_side.py,
torch_decode.py); keep it next to them when copying them to the GPU machine."""
import torch


def bench(fn, iters=20):
    """Milliseconds per call of `fn`: one warm-up call, then the median of 3 rounds of `iters`
    calls timed with CUDA events."""
    fn()
    torch.cuda.synchronize()
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(3):
        start.record()
        for _ in range(iters):
            fn()
        stop.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(stop) / iters)
    times.sort()
    return times[1]
