#!/usr/bin/env python3
"""Golden fixtures for attnrt, from an independent PyTorch implementation of SPEC.md.

How the data is made
--------------------
* Every case builds the attention layer of ../../../shared/SPEC.md (copied semantics, written
  here from the SPEC, not from the Rust code) in PyTorch **float64** on the CPU: projections,
  full or per-head RMSNorm, rotary embedding, a dense boolean mask built element by element from
  the SPEC's rules, softmax over visible keys, zero output for rows that see nothing, output
  projection.
* Rotary tables are built in float64 from theta with the llama3 / yarn scalings. Where the
  `transformers` package is importable, its own rope initialisers are evaluated on the same
  settings and must agree with ours to 1e-12 (printed per case).
* As a cross-check of the masking, the attention core is also run through
  `torch.nn.functional.scaled_dot_product_attention` (float32, on CUDA when present) with the
  same boolean mask; it must agree with the float64 result to 1e-4.
* Inputs and float weights are stored as float32 (or bf16/f16 for the reduced-precision cases,
  whose rounded values are what the float64 evaluation uses); the expected output `y` is the
  float64 result rounded to float32.

Run on the GPU machine (PyTorch is there):  python3 tests/golden/make_golden.py tests/fixtures
Each fixture is one safetensors file: tensors `x`, `y`, the weights under the names of
README.md, and any of `seq_lens`, `document_ids`, `cu_seqlens`, `max_seqlen`, `position_ids`,
`freqs_cis`; metadata `config` (the layer JSON of README.md), `batch`, `seq_len`,
`rope_max_pos` (table length when the runtime builds the table itself), `description`,
`generator`.
"""
import json
import math
import os
import sys

import torch
from safetensors.torch import save_file

torch.set_default_dtype(torch.float64)


# ---------------------------------------------------------------- rotary tables (float64)
def inv_freq_plain(theta, d):
    return theta ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)


def inv_freq_llama3(theta, d, factor, low, high, orig):
    base = inv_freq_plain(theta, d)
    wavelen = 2 * math.pi / base
    low_wl, high_wl = orig / low, orig / high
    out = torch.where(wavelen > low_wl, base / factor, base)
    s = (orig / wavelen - low) / (high - low)
    smoothed = (1 - s) * base / factor + s * base
    medium = (wavelen >= high_wl) & (wavelen <= low_wl)
    return torch.where(medium, smoothed, out)


def inv_freq_yarn(theta, d, factor, orig, beta_fast, beta_slow):
    base = inv_freq_plain(theta, d)

    def corr_dim(rot):
        return d * math.log(orig / (rot * 2 * math.pi)) / (2 * math.log(theta))

    lo = max(math.floor(corr_dim(beta_fast)), 0)
    hi = min(math.ceil(corr_dim(beta_slow)), d - 1)
    if lo == hi:
        hi += 0.001
    ramp = ((torch.arange(d // 2, dtype=torch.float64) - lo) / (hi - lo)).clamp(0, 1)
    extrap = 1 - ramp
    return base / factor * (1 - extrap) + base * extrap


def inv_freq_for(rope, d):
    sc = rope.get("scaling")
    theta = rope.get("theta", 10000.0)
    if sc is None:
        return inv_freq_plain(theta, d), 1.0
    if sc["type"] == "llama3":
        return inv_freq_llama3(theta, d, sc["factor"], sc["low_freq_factor"], sc["high_freq_factor"],
                               sc["original_max_position_embeddings"]), 1.0
    if sc["type"] == "yarn":
        return inv_freq_yarn(theta, d, sc["factor"], sc["original_max_position_embeddings"],
                             sc["beta_fast"], sc["beta_slow"]), sc["attention_factor"]
    raise ValueError(sc)


def check_against_transformers(rope, d):
    """Evaluates transformers' own rope initialiser for the same settings, if available."""
    sc = rope.get("scaling")
    try:
        from transformers import PretrainedConfig
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    except Exception as e:  # pragma: no cover - depends on the machine
        return f"transformers unavailable ({type(e).__name__})"
    if sc is None:
        return "plain (no transformers check needed)"
    rs = {"rope_type": sc["type"], "factor": sc["factor"],
          "original_max_position_embeddings": sc["original_max_position_embeddings"]}
    if sc["type"] == "llama3":
        rs.update(low_freq_factor=sc["low_freq_factor"], high_freq_factor=sc["high_freq_factor"])
    else:
        rs.update(attention_factor=sc["attention_factor"], beta_fast=sc["beta_fast"],
                  beta_slow=sc["beta_slow"])
    cfg = PretrainedConfig()
    cfg.rope_theta = rope.get("theta", 10000.0)
    cfg.rope_scaling = rs
    cfg.rope_parameters = dict(rs, rope_theta=cfg.rope_theta)
    cfg.head_dim = d
    cfg.hidden_size = d
    cfg.num_attention_heads = 1
    cfg.partial_rotary_factor = 1.0
    cfg.max_position_embeddings = sc["original_max_position_embeddings"] * int(sc["factor"])
    try:
        theirs, att = ROPE_INIT_FUNCTIONS[sc["type"]](cfg, "cpu")
    except Exception as e:  # pragma: no cover - API drift between versions
        return f"transformers call failed ({type(e).__name__}: {e})"
    ours, our_att = inv_freq_for(rope, d)
    # transformers computes in float32; agree to float32 precision.
    err = (theirs.double() - ours).abs().max().item() / ours.abs().max().item()
    assert err < 1e-6, f"{sc['type']}: transformers disagrees by {err}"
    assert abs(att - our_att) < 1e-6, f"{sc['type']}: attention factor {att} vs {our_att}"
    return f"matches transformers {sc['type']} (rel {err:.1e})"


def table(rope, d, max_pos):
    f, amp = inv_freq_for(rope, d)
    ang = torch.outer(torch.arange(max_pos, dtype=torch.float64), f)
    return torch.stack([torch.cos(ang) * amp, torch.sin(ang) * amp], dim=-1)  # [P, D/2, 2]


def rotate(z, cs, convention):
    """z [B, T, heads, D]; cs [B, T, D/2, 2]."""
    c, s = cs[..., 0].unsqueeze(2), cs[..., 1].unsqueeze(2)
    d = z.shape[-1]
    if convention == "interleaved":
        a, b = z[..., 0::2], z[..., 1::2]
        out = torch.empty_like(z)
        out[..., 0::2] = a * c - b * s
        out[..., 1::2] = a * s + b * c
        return out
    a, b = z[..., : d // 2], z[..., d // 2:]
    return torch.cat([a * c - b * s, a * s + b * c], dim=-1)


# ---------------------------------------------------------------- the layer (float64)
def rms(z, w, eps):
    return z * torch.rsqrt(z.pow(2).mean(-1, keepdim=True) + eps) * w


def dense_mask(B, T, window, seq_lens, doc_ids, cu):
    m = torch.zeros(B, T, T, dtype=torch.bool)
    for b in range(B):
        for i in range(T):
            for j in range(T):
                ok = j <= i
                if window is not None:
                    ok &= i - j < window
                if seq_lens is not None:
                    ok &= i < seq_lens[b] and j < seq_lens[b]
                if doc_ids is not None:
                    ok &= doc_ids[b][i] == doc_ids[b][j]
                if cu is not None:
                    seg = lambda t: max(s for s in range(len(cu) - 1) if cu[s] <= t < cu[s + 1])
                    ok &= seg(i) == seg(j)
                m[b, i, j] = ok
    return m


def forward(cfg, W, x, mask, positions, freqs):
    B, T, C = x.shape
    H, KV, D = cfg["n_head"], cfg["n_kv_head"], cfg["head_dim"]
    eps = cfg.get("rmsnorm_eps", 1e-5)

    def lin(z, w, b):
        y = z @ w.T
        return y + b if b is not None else y

    q = lin(x, W["wq"], W.get("bq"))
    k = lin(x, W["wk"], W.get("bk"))
    v = lin(x, W["wv"], W.get("bv"))
    if cfg["qk_norm"] == "full":
        q, k = rms(q, W["q_norm"], eps), rms(k, W["k_norm"], eps)
    q, k, v = q.view(B, T, H, D), k.view(B, T, KV, D), v.view(B, T, KV, D)
    if cfg["qk_norm"] == "per_head":
        q, k = rms(q, W["q_norm"], eps), rms(k, W["k_norm"], eps)
    if cfg.get("rope") is not None:
        cs = freqs[positions]  # [B, T, D/2, 2]
        q, k = rotate(q, cs, cfg["rope"]["convention"]), rotate(k, cs, cfg["rope"]["convention"])
    R = H // KV
    k, v = k.repeat_interleave(R, dim=2), v.repeat_interleave(R, dim=2)
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [B, H, T, D]
    s = q @ k.transpose(-1, -2) / math.sqrt(D)
    s = s.masked_fill(~mask[:, None], float("-inf"))
    p = torch.softmax(s, dim=-1)
    p = torch.nan_to_num(p, nan=0.0)  # rows with no visible key: output exactly 0
    o = p @ v
    # Cross-check the mask handling with SDPA in float32.
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    o32 = torch.nn.functional.scaled_dot_product_attention(
        q.float().to(dev), k.float().to(dev), v.float().to(dev), attn_mask=mask[:, None].to(dev))
    o32 = torch.nan_to_num(o32, nan=0.0).double().cpu()
    empty = ~mask.any(-1)  # [B, T]
    o32[empty[:, None].expand_as(o32[..., 0])] = 0.0
    sdpa_err = (o32 - o).abs().max().item() if o.numel() else 0.0
    assert sdpa_err < 1e-4, f"SDPA disagrees with the float64 evaluation by {sdpa_err}"
    o = o.transpose(1, 2).reshape(B, T, H * D)
    return lin(o, W["wo"], W.get("bo")), sdpa_err


# ---------------------------------------------------------------- cases
def case(name, desc, *, C, H, KV=None, D=None, B=1, T=8, bias=False, qk_norm="none", window=None,
         rope=None, table_src="theta", seq_lens=None, doc_ids=None, cu=None, max_seqlen=None,
         positions=None, wdtype="f32", eps=1e-5):
    return dict(name=name, desc=desc, C=C, H=H, KV=KV or H, D=D or C // H, B=B, T=T, bias=bias,
                qk_norm=qk_norm, window=window, rope=rope, table_src=table_src, seq_lens=seq_lens,
                doc_ids=doc_ids, cu=cu, max_seqlen=max_seqlen, positions=positions, wdtype=wdtype,
                eps=eps)


ROPE = {"convention": "interleaved", "theta": 10000.0, "scaling": None}
HALF = {"convention": "half_split", "theta": 10000.0, "scaling": None}
LLAMA3 = {"convention": "interleaved", "theta": 500000.0,
          "scaling": {"type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 64}}
YARN = {"convention": "half_split", "theta": 10000.0,
        "scaling": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32,
                    "attention_factor": 0.1 * math.log(4.0) + 1.0, "beta_fast": 32.0,
                    "beta_slow": 1.0}}
DOCS3 = [[0, 0, 0, 1, 1, 2, 2, 2, 2, 2]]
RESTART = [[0, 1, 2, 0, 1, 0, 1, 2, 3, 4]]

CASES = [
    case("mha_nope", "GPT-2 style MHA, no positional embedding, batch 2", C=32, H=4, B=2, T=7),
    case("gqa_rope", "GQA 8/2 with interleaved RoPE from theta", C=64, H=8, KV=2, T=9, rope=ROPE),
    case("mqa_rope", "MQA 4/1", C=32, H=4, KV=1, T=6, rope=ROPE),
    case("head_dim_decoupled", "head_dim 16 != n_embd/n_head 12, GQA 4/2", C=48, H=4, KV=2, D=16,
         T=8, rope=ROPE),
    case("bias_all", "bias on every projection", C=32, H=4, KV=2, T=8, bias=True, rope=ROPE),
    case("bias_qkv_only", "q/k/v biases without output bias (Qwen2 style)", C=32, H=4, KV=2, T=8,
         bias={"q": True, "k": True, "v": True, "o": False}, rope=ROPE),
    case("qknorm_per_head", "per-head QK RMSNorm", C=32, H=4, KV=2, T=8, qk_norm="per_head",
         rope=ROPE),
    case("qknorm_full_gqa", "full QK RMSNorm with GQA 6/3, eps 1e-6", C=48, H=6, KV=3, T=8,
         qk_norm="full", rope=ROPE, eps=1e-6),
    case("rope_half_split", "half-split (rotate-half) RoPE", C=32, H=4, T=8, rope=HALF),
    case("rope_llama3", "llama3-scaled table, positions past the original context", C=64, H=4, KV=2,
         T=6, rope=LLAMA3, positions=[[60, 61, 62, 100, 200, 250]]),
    case("rope_yarn", "yarn-scaled table with attention factor, half-split", C=64, H=4, KV=2, T=8,
         rope=YARN, positions=[[0, 5, 17, 31, 32, 64, 90, 127]]),
    case("rope_caller_table", "caller-supplied freqs_cis (theta 500, 40 positions)", C=32, H=4, T=8,
         rope={"convention": "interleaved", "theta": 500.0, "scaling": None}, table_src="caller",
         positions=[[3, 1, 4, 1, 5, 9, 2, 6]]),
    case("window", "sliding window 3", C=32, H=4, KV=2, T=10, window=3, rope=ROPE),
    case("padding", "padding: a full row, a row of length 1, a row of length 0", C=32, H=4, KV=2,
         B=3, T=6, seq_lens=[6, 1, 0], bias=True, rope=ROPE),
    case("window_padding", "window 2 + padding", C=32, H=4, B=2, T=7, window=2, seq_lens=[5, 7],
         rope=ROPE),
    case("documents_global_pos", "3 packed documents, positions are global indices", C=32, H=4,
         KV=2, T=10, doc_ids=DOCS3, rope=ROPE),
    case("documents_restart_pos", "3 packed documents with positions restarting per document",
         C=32, H=4, KV=2, T=10, doc_ids=DOCS3, positions=RESTART, rope=ROPE),
    case("window_documents", "window 2 + documents (unsorted ids, batch 2)", C=32, H=4, B=2, T=10,
         window=2, doc_ids=[[0, 0, 0, 1, 1, 2, 2, 2, 2, 2], [5, 5, 3, 3, 3, 5, 5, 5, 1, 1]],
         rope=ROPE),
    case("varlen", "varlen cu_seqlens with an empty segment and max_seqlen", C=32, H=4, KV=2, T=10,
         cu=[0, 3, 3, 8, 10], max_seqlen=5, rope=ROPE),
    case("window_varlen_gqa_qknorm", "window 3 + varlen + GQA 8/2 + per-head QK-norm", C=64, H=8,
         KV=2, T=12, window=3, cu=[0, 5, 12], qk_norm="per_head", rope=ROPE,
         positions=[[0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 5, 6]]),
    case("varlen_and_documents", "cu_seqlens and document ids both applied", C=32, H=4, T=10,
         cu=[0, 6, 10], doc_ids=[[0, 0, 1, 1, 1, 1, 1, 1, 2, 2]], rope=ROPE),
    case("weights_bf16", "bf16 weights, GQA, bias, per-head norm", C=64, H=4, KV=2, T=8, bias=True,
         qk_norm="per_head", rope=ROPE, wdtype="bf16"),
    case("weights_f16", "f16 weights, full norm, window", C=64, H=4, KV=1, T=8, qk_norm="full",
         window=4, rope=HALF, wdtype="f16"),
    case("single_token", "one token", C=32, H=4, KV=2, T=1, rope=ROPE),
    case("odd_head_dim_nope", "odd head_dim 5 without rope", C=20, H=4, T=6),
    case("everything", "padding + documents + window + full norm + bias + llama3 half-split", C=64,
         H=8, KV=4, B=2, T=9, window=3, seq_lens=[9, 6],
         doc_ids=[[0, 0, 0, 0, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1, 2, 2, 2]], qk_norm="full",
         bias=True, rope=dict(LLAMA3, convention="half_split")),
    case("long_tiles", "T 70 across kernel tiles: window 40 + documents, head_dim 64", C=128, H=4,
         KV=2, D=64, T=70, window=40, doc_ids=[[0] * 30 + [1] * 25 + [2] * 15], rope=ROPE),
]


def to_storage(t, wdtype):
    return {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}[wdtype]


def build(c, gen):
    C, H, KV, D, B, T = c["C"], c["H"], c["KV"], c["D"], c["B"], c["T"]
    bias = c["bias"]
    flags = bias if isinstance(bias, dict) else {k: bool(bias) for k in "qkvo"}
    cfg = {"n_embd": C, "n_head": H, "n_kv_head": KV, "head_dim": D, "bias": flags,
           "qk_norm": c["qk_norm"], "rmsnorm_eps": c["eps"], "sliding_window": c["window"],
           "rope": c["rope"]}
    sdt = to_storage(None, c["wdtype"])

    def randn(*shape, scale=1.0):
        return torch.randn(*shape, generator=gen, dtype=torch.float64) * scale

    stored, W = {}, {}

    def weight(name, t):
        s = t.to(sdt)
        stored[name] = s.contiguous()
        W[name] = s.double()

    weight("wq", randn(H * D, C, scale=C ** -0.5))
    weight("wk", randn(KV * D, C, scale=C ** -0.5))
    weight("wv", randn(KV * D, C, scale=C ** -0.5))
    weight("wo", randn(C, H * D, scale=(H * D) ** -0.5))
    for p, n in (("q", H * D), ("k", KV * D), ("v", KV * D), ("o", C)):
        if flags[p]:
            weight("b" + p, randn(n, scale=0.5))
    if c["qk_norm"] != "none":
        qn, kn = (D, D) if c["qk_norm"] == "per_head" else (H * D, KV * D)
        weight("q_norm", 1.0 + randn(qn, scale=0.2))
        weight("k_norm", 1.0 + randn(kn, scale=0.2))

    x32 = randn(B, T, C).float()
    tensors = {"x": x32}
    meta = {"batch": str(B), "seq_len": str(T)}
    positions = c["positions"]
    pos_t = (torch.tensor(positions, dtype=torch.long) if positions is not None
             else torch.arange(T).expand(B, T))
    freqs, note = None, "no rope"
    if c["rope"] is not None:
        note = check_against_transformers(c["rope"], D)
        max_pos = int(pos_t.max().item()) + 1 if T > 0 else 1
        if c["table_src"] == "caller":
            max_pos = 40
            freqs = table(c["rope"], D, max_pos).float().double()
            tensors["freqs_cis"] = freqs.float()
        else:
            freqs = table(c["rope"], D, max_pos)
            meta["rope_max_pos"] = str(max_pos)
    if positions is not None:
        tensors["position_ids"] = pos_t.to(torch.int32)
    if c["seq_lens"] is not None:
        tensors["seq_lens"] = torch.tensor(c["seq_lens"], dtype=torch.int32)
    if c["doc_ids"] is not None:
        tensors["document_ids"] = torch.tensor(c["doc_ids"], dtype=torch.int32)
    if c["cu"] is not None:
        tensors["cu_seqlens"] = torch.tensor(c["cu"], dtype=torch.int32)
    if c["max_seqlen"] is not None:
        tensors["max_seqlen"] = torch.tensor([c["max_seqlen"]], dtype=torch.int32)

    mask = dense_mask(B, T, c["window"], c["seq_lens"], c["doc_ids"], c["cu"])
    y, sdpa_err = forward(cfg, W, x32.double(), mask, pos_t, freqs)
    tensors["y"] = y.float()
    tensors.update(stored)
    meta.update(config=json.dumps(cfg), description=c["desc"],
                generator="tests/golden/make_golden.py: float64 PyTorch "
                          f"{torch.__version__}, SDPA cross-check max err {sdpa_err:.2e}; {note}")
    return tensors, meta, sdpa_err, note


def main():
    out_dir = sys.argv[1] if len(sys.argv) > 1 else "tests/fixtures"
    os.makedirs(out_dir, exist_ok=True)
    for i, c in enumerate(CASES):
        gen = torch.Generator().manual_seed(1000 + i)
        tensors, meta, err, note = build(c, gen)
        save_file(tensors, os.path.join(out_dir, c["name"] + ".safetensors"), metadata=meta)
        print(f"{c['name']:28s} sdpa_err={err:.2e}  {note}")
    print(f"{len(CASES)} fixtures written to {out_dir}")


if __name__ == "__main__":
    main()
