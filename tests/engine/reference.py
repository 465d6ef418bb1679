"""A plain numpy (float64) forward pass of Qwen2 / Llama from a Hugging Face
folder written by make_gguf.py, following transformers' modelling code
(rotate-half RoPE, Llama-3.1 `rope_scaling`, GQA, q/k/v biases for Qwen2).

Why: it is a third, independent implementation. Agreeing with llama.cpp on
the F32 GGUF proves make_gguf.py wrote "the same model" twice (the q/k
permutation, the rope_freqs tensor, names and metadata), so a moat mismatch
can be blamed on moat and not on the fixture. It is short and slow on
purpose: it recomputes the whole sequence for every token (tiny shapes only).
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import numpy as np


def read_safetensors(path: Path) -> dict[str, np.ndarray]:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    base = 8 + n
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info["dtype"] != "F32":
            raise ValueError(f"{path}: {name} is {info['dtype']}, the reference reads F32 only")
        a, b = info["data_offsets"]
        out[name] = np.frombuffer(raw[base + a : base + b], dtype="<f4").reshape(info["shape"]).astype(np.float64)
    return out


class Reference:
    def __init__(self, folder: Path, ignore_rope_scaling: bool = False):
        self.cfg = json.loads((folder / "config.json").read_text())
        self.w = read_safetensors(folder / "model.safetensors")
        c = self.cfg
        self.heads, self.kv_heads = c["num_attention_heads"], c["num_key_value_heads"]
        self.head_dim = c.get("head_dim") or c["hidden_size"] // self.heads
        self.eps = c["rms_norm_eps"]
        d = self.head_dim
        inv_freq = 1.0 / (c["rope_theta"] ** (np.arange(0, d, 2, dtype=np.float64) / d))
        sc = c.get("rope_scaling")
        if sc and not ignore_rope_scaling:
            if sc.get("rope_type") != "llama3":
                raise ValueError(f"reference: rope_scaling {sc} not supported")
            inv_freq = llama3_inv_freq(inv_freq, sc)
        self.inv_freq = inv_freq

    def rms(self, x: np.ndarray, w: np.ndarray) -> np.ndarray:
        return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + self.eps) * w

    def rope(self, x: np.ndarray) -> np.ndarray:
        # x: (T, H, D), HF rotate-half convention.
        t = x.shape[0]
        ang = np.arange(t, dtype=np.float64)[:, None] * self.inv_freq[None, :]
        emb = np.concatenate([ang, ang], axis=-1)[:, None, :]
        half = x.shape[-1] // 2
        rot = np.concatenate([-x[..., half:], x[..., :half]], axis=-1)
        return x * np.cos(emb) + rot * np.sin(emb)

    def logits(self, tokens: list[int]) -> np.ndarray:
        """Logits of the last position for the whole sequence `tokens`."""
        w, t = self.w, len(tokens)
        x = w["model.embed_tokens.weight"][tokens]
        group = self.heads // self.kv_heads
        mask = np.triu(np.full((t, t), -np.inf), k=1)
        for n in range(self.cfg["num_hidden_layers"]):
            p = f"model.layers.{n}."
            h = self.rms(x, w[p + "input_layernorm.weight"])

            def proj(name: str) -> np.ndarray:
                y = h @ w[p + f"self_attn.{name}.weight"].T
                bias = w.get(p + f"self_attn.{name}.bias")
                return y if bias is None else y + bias

            q = self.rope(proj("q_proj").reshape(t, self.heads, self.head_dim))
            k = self.rope(proj("k_proj").reshape(t, self.kv_heads, self.head_dim))
            v = proj("v_proj").reshape(t, self.kv_heads, self.head_dim)
            out = np.empty_like(q)
            for hd in range(self.heads):
                kv = hd // group
                s = q[:, hd, :] @ k[:, kv, :].T / math.sqrt(self.head_dim) + mask
                s = np.exp(s - s.max(axis=-1, keepdims=True))
                s /= s.sum(axis=-1, keepdims=True)
                out[:, hd, :] = s @ v[:, kv, :]
            x = x + out.reshape(t, -1) @ w[p + "self_attn.o_proj.weight"].T
            h = self.rms(x, w[p + "post_attention_layernorm.weight"])
            g = h @ w[p + "mlp.gate_proj.weight"].T
            u = h @ w[p + "mlp.up_proj.weight"].T
            x = x + (g / (1.0 + np.exp(-g)) * u) @ w[p + "mlp.down_proj.weight"].T
        x = self.rms(x[-1], w["model.norm.weight"])
        return x @ w["lm_head.weight"].T

    def greedy(self, prompt: list[int], steps: int) -> tuple[list[int], list[np.ndarray]]:
        seq, toks, logits = list(prompt), [], []
        for _ in range(steps):
            lg = self.logits(seq)
            tok = int(np.argmax(lg))
            toks.append(tok)
            logits.append(lg)
            seq.append(tok)
        return toks, logits


def llama3_inv_freq(inv_freq: np.ndarray, sc: dict) -> np.ndarray:
    """transformers' `_compute_llama3_parameters`."""
    factor, lo, hi = sc["factor"], sc["low_freq_factor"], sc["high_freq_factor"]
    old = sc["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old / lo, old / hi
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old / wavelen - lo) / (hi - lo)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return np.where(medium, smoothed, scaled)
