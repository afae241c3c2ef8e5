#!/usr/bin/env python3
"""PyTorch side of the decode benchmark, run in the same device call as attnrt-cuda-bench.

Decode of one new token per sequence (bf16, Hq 32, Hkv 8, head_dim 128) over 32 x 8192 and
1 x 32768 cached tokens: SDPA with q [B, 32, 1, 128] and a contiguous K/V copy [B, 8, L, 128]
(the paged layout flattened for torch), enable_gqa=True (K/V read once per KV head), on the
flash, cuDNN and memory-efficient backends, plus a device-to-device copy for the measured
bandwidth. GB/s count the K and V bytes read once.

Usage: python3 torch_decode.py [attnrt.json] [table.md]
"""
import json
import sys
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from cuda_timing import bench

H, KV, D = 32, 8, 128
dev = "cuda"


name = torch.cuda.get_device_name()
print(f"PyTorch {torch.__version__} on {name}", flush=True)
a = torch.empty(1 << 30, dtype=torch.uint8, device=dev)
b = torch.empty_like(a)
copy_ms = bench(lambda: b.copy_(a), 10)
copy = 2 * (1 << 30) / (copy_ms * 1e-3) / 1e9
del a, b
print(f"  torch device copy 1 GiB: {copy:.0f} GB/s", flush=True)
rows = []
for bsz, L in ((32, 8192), (1, 32768)):
    q = torch.randn(bsz, H, 1, D, device=dev, dtype=torch.bfloat16)
    k = torch.randn(bsz, KV, L, D, device=dev, dtype=torch.bfloat16)
    v = torch.randn(bsz, KV, L, D, device=dev, dtype=torch.bfloat16)
    byts = 2 * k.numel() * 2
    case = f"decode {bsz} x {L - 1}"
    for pname, be in (("SDPA flash", SDPBackend.FLASH_ATTENTION), ("SDPA cuDNN", SDPBackend.CUDNN_ATTENTION),
                      ("SDPA efficient", SDPBackend.EFFICIENT_ATTENTION)):
        try:
            with sdpa_kernel(be):
                ms = bench(lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True))
            gbs = byts / (ms * 1e-3) / 1e9
            rows.append((case, pname, ms, gbs))
            print(f"  {case:20} {pname:16} {ms:8.4f} ms {gbs:7.0f} GB/s ({100 * gbs / copy:.0f}% of copy)", flush=True)
        except Exception as ex:
            print(f"  {case} {pname}: unavailable ({str(ex).splitlines()[0][:120]})", flush=True)
    del q, k, v

if len(sys.argv) > 1:
    ours = {}
    with open(sys.argv[1]) as f:
        for line in f:
            if line.strip():
                r = json.loads(line)
                ours[r["case"]] = r
    ac = ours.get("copy", {}).get("gbs", copy)
    out = [f"GPU: {name}, PyTorch {torch.__version__}, {time.strftime('%Y-%m-%d')}; "
           f"device-to-device copy (read + write): attnrt-side {ac:.0f} GB/s, torch-side {copy:.0f} GB/s", "",
           "| case | attnrt ms | attnrt GB/s | % of copy BW | PyTorch path | PyTorch ms | PyTorch GB/s | speed ratio attnrt/PyTorch |",
           "| --- | ---: | ---: | ---: | --- | ---: | ---: | ---: |"]
    for case, pname, ms, gbs in rows:
        o = ours.get(case)
        if not o:
            continue
        out.append(f"| {case} | {o['ms']:.4f} | {o['gbs']:.0f} | {100 * o['gbs'] / ac:.0f}% | {pname} | {ms:.4f} | "
                   f"{gbs:.0f} | {ms / o['ms']:.2f}x |")
    text = "\n".join(out)
    print(text)
    if len(sys.argv) > 2:
        with open(sys.argv[2], "w") as f:
            f.write(text + "\n")
