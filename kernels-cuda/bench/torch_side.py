#!/usr/bin/env python3
"""PyTorch side of the attnrt CUDA benchmark, run in the same device call as attnrt-cuda-bench.

Same shapes (bf16, Hq 32, Hkv 8, head_dim 128): SDPA flash and cuDNN backends on causal prefill
T = 2048 / 8192, FlexAttention (compiled) for the sliding window 4096 at T = 16384 and 8 packed
documents at T = 16384, and the whole layer (n_embd 4096, T = 4096, RoPE, causal) in eager
mode. Useful TFLOP/s count only unmasked (query, key) pairs, 4 * D flops each per head.

Usage: python3 torch_side.py [attnrt.json] [table.md]
With attnrt's JSON lines, prints the merged table with ratios (attnrt / PyTorch) and writes it.
"""
import json
import sys
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from cuda_timing import bench

H, KV, D, C = 32, 8, 128, 4096
dev = "cuda"
torch.manual_seed(0)


def pairs(t, window=None, docs=1):
    n, ln = 0, t // docs
    for d in range(docs):
        l = t - ln * d if d + 1 == docs else ln
        if window is None:
            n += l * (l + 1) // 2
        else:
            w = min(window, l)
            n += w * (w + 1) // 2 + (l - w) * w
    return n


def qkv(t):
    q = torch.randn(1, H, t, D, device=dev, dtype=torch.bfloat16)
    k = torch.randn(1, KV, t, D, device=dev, dtype=torch.bfloat16)
    v = torch.randn(1, KV, t, D, device=dev, dtype=torch.bfloat16)
    # GQA expanded outside the timed region (attnrt reads the KV head once per group in-kernel).
    return q, k.repeat_interleave(H // KV, 1), v.repeat_interleave(H // KV, 1)


rows = []


def record(case, path, ms, flops):
    tf = flops / (ms * 1e-3) / 1e12 if flops else None
    rows.append({"case": case, "path": path, "ms": ms, "tflops": tf})
    print(f"  {case:34} {path:22} {ms:9.3f} ms" + (f" {tf:8.1f} TFLOP/s" if tf else ""), flush=True)


print(f"PyTorch {torch.__version__} on {torch.cuda.get_device_name()}", flush=True)
for t in (2048, 8192):
    q, k, v = qkv(t)
    fl = pairs(t) * H * 4 * D
    for name, be in (("SDPA flash", SDPBackend.FLASH_ATTENTION), ("SDPA cuDNN", SDPBackend.CUDNN_ATTENTION)):
        try:
            with sdpa_kernel(be):
                ms = bench(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True))
            record(f"causal T={t}", name, ms, fl)
        except Exception as e:  # a backend may be unavailable
            print(f"  causal T={t} {name}: unavailable ({e})", flush=True)
    del q, k, v

try:
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    flex = torch.compile(flex_attention, dynamic=False)
    T = 16384
    q, k, v = qkv(T)

    def window_mod(b, h, qi, kj):
        return (kj <= qi) & (qi - kj < 4096)

    bm = create_block_mask(window_mod, 1, 1, T, T, device=dev)
    ms = bench(lambda: flex(q, k, v, block_mask=bm))
    record("window 4096, T=16384", "FlexAttention", ms, pairs(T, 4096) * H * 4 * D)

    doc = (torch.arange(T, device=dev) // (T // 8)).clamp(max=7)

    def doc_mod(b, h, qi, kj):
        return (kj <= qi) & (doc[qi] == doc[kj])

    bm = create_block_mask(doc_mod, 1, 1, T, T, device=dev)
    ms = bench(lambda: flex(q, k, v, block_mask=bm))
    fl = pairs(T, None, 8) * H * 4 * D
    record("8 documents (ids), T=16384", "FlexAttention", ms, fl)
    record("8 documents (varlen), T=16384", "FlexAttention", ms, fl)
    del q, k, v
except Exception as e:
    print(f"  FlexAttention unavailable: {e}", flush=True)


# Whole layer, eager: projections, interleaved RoPE, SDPA causal (default backend), output.
class Layer(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.wq = torch.nn.Linear(C, H * D, bias=False)
        self.wk = torch.nn.Linear(C, KV * D, bias=False)
        self.wv = torch.nn.Linear(C, KV * D, bias=False)
        self.wo = torch.nn.Linear(H * D, C, bias=False)

    def forward(self, x, cos, sin):
        b, t, _ = x.shape
        q = self.wq(x).view(b, t, H, D)
        k = self.wk(x).view(b, t, KV, D)
        v = self.wv(x).view(b, t, KV, D)

        def rope(z):
            z1, z2 = z[..., 0::2].float(), z[..., 1::2].float()
            out = torch.stack((z1 * cos - z2 * sin, z1 * sin + z2 * cos), dim=-1)
            return out.flatten(-2).type_as(z)

        q, k = rope(q).transpose(1, 2), rope(k).transpose(1, 2)
        v = v.transpose(1, 2)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        return self.wo(o.transpose(1, 2).reshape(b, t, H * D))


T = 4096
layer = Layer().to(dev, torch.bfloat16)
x = torch.randn(1, T, C, device=dev, dtype=torch.bfloat16)
inv = 500000.0 ** (-torch.arange(0, D, 2, device=dev, dtype=torch.float64) / D)
ang = torch.arange(T, device=dev, dtype=torch.float64)[:, None] * inv[None, :]
cos, sin = ang.cos().float()[None, :, None, :], ang.sin().float()[None, :, None, :]
with torch.no_grad():
    ms = bench(lambda: layer(x, cos, sin))
record("whole layer C=4096 T=4096", "PyTorch eager", ms, None)

if len(sys.argv) > 1:
    ours = {}
    with open(sys.argv[1]) as f:
        for line in f:
            if line.strip():
                r = json.loads(line)
                ours[r["case"]] = r
    out = [
        f"GPU: {torch.cuda.get_device_name()}, PyTorch {torch.__version__}, "
        f"{time.strftime('%Y-%m-%d')}",
        "",
        "| case | attnrt ms | attnrt TFLOP/s | PyTorch path | PyTorch ms | PyTorch TFLOP/s | speed ratio attnrt/PyTorch |",
        "| --- | ---: | ---: | --- | ---: | ---: | ---: |",
    ]
    for r in rows:
        o = ours.get(r["case"])
        if not o:
            continue
        otf = o.get("tflops")
        out.append(
            f"| {r['case']} | {o['ms']:.3f} | {otf:.1f} | {r['path']} | {r['ms']:.3f} | "
            + (f"{r['tflops']:.1f}" if r["tflops"] else "-")
            + f" | {r['ms'] / o['ms']:.2f}x |"
            if otf
            else f"| {r['case']} | {o['ms']:.3f} | - | {r['path']} | {r['ms']:.3f} | - | {r['ms'] / o['ms']:.2f}x |"
        )
    text = "\n".join(out)
    print(text)
    if len(sys.argv) > 2:
        with open(sys.argv[2], "w") as f:
            f.write(text + "\n")
