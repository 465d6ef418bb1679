"""Random-weight Qwen2 / Llama models, written both as llama.cpp GGUF and as a
Hugging Face folder holding the *same* weights, for checking moat's engine
against llama.cpp (issue 9: tests/engine/test_parity.py, bench/engine.sh).

Why a generator and not a published model: no model weights may be fetched
here, and random weights with real shapes exercise every kernel and every
metadata path that a real checkpoint does.

What "the same model" means:
  * each HF tensor is drawn from its own RNG stream keyed by (seed, HF name),
    so any subset can be generated in any order (the 1.5B shapes are streamed
    to disk one tensor at a time, never held in memory whole);
  * the GGUF gets the tensors under llama.cpp's names with the layout
    llama.cpp's own converter (convert_hf_to_gguf.py) gives them: for Llama
    the q/k projections are PERMUTED from HF's rotate-half RoPE order to
    GGUF's interleaved order (exactly `LlamaModel.permute`); Qwen2 is
    NEOX-style in llama.cpp and is not permuted;
  * 1-D tensors (norms, biases, rope_freqs) stay F32 in the F16 GGUF, as the
    converter keeps them.

Vocabulary: a real GPT-2-style byte-level BPE (256 byte tokens, then merges of
an existing token with a byte token, then DeepSeek-R1's special tokens at the
end, as moat's own demo model does), stored as `tokenizer.ggml.model = gpt2`
with tokens, types and merges in the GGUF and as `tokenizer.json` in the HF
folder. `gpt2` rather than `none` because moat's loader needs a tokenizer and
llama.cpp accepts it in every version.

Llama-3.1 RoPE scaling (R1-Distill-Llama-8B has it): `rope_scaling` in
config.json and, as the converter writes it, the per-dimension divisor tensor
`rope_freqs.weight` in the GGUF. The tiny variant uses
original_max_position_embeddings = 64 so that the scaling changes outputs
within a 40-token test (with 8192 it would only change far positions).

CLI:
  make_gguf.py --arch qwen2|llama --shape tiny|r1-1.5b --seed N --out DIR
               [--rope-scaling] [--formats f32,f16,hf]
  writes DIR/model-f32.gguf, DIR/model-f16.gguf, DIR/hf/ ...
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import struct
import subprocess
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import gguf

SPECIAL_TOKENS = [
    ("<｜end▁of▁sentence｜>", True),
    ("<｜User｜>", True),
    ("<｜Assistant｜>", True),
    ("<｜begin▁of▁sentence｜>", True),
    ("<|EOT|>", True),
    ("<think>", False),
    ("</think>", False),
    ("<｜pad｜>", True),
]
BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
PAD = "<｜pad｜>"

# DeepSeek-R1-Distill's template (the one moat's demo model ships).
CHAT_TEMPLATE = (
    "{% if not add_generation_prompt is defined %}{% set add_generation_prompt = false %}{% endif %}"
    "{% set ns = namespace(system_prompt='', is_first_sp=true) %}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'system' %}"
    "{%- if ns.is_first_sp %}{% set ns.system_prompt = ns.system_prompt + message['content'] %}"
    "{% set ns.is_first_sp = false %}"
    "{%- else %}{% set ns.system_prompt = ns.system_prompt + '\\n\\n' + message['content'] %}{%- endif %}"
    "{%- endif %}"
    "{%- endfor %}"
    "{{ bos_token }}{{ ns.system_prompt }}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'user' %}{{ '<｜User｜>' + message['content'] }}{%- endif %}"
    "{%- if message['role'] == 'assistant' and message['content'] is not none %}"
    "{% set content = message['content'] %}"
    "{% if '</think>' in content %}{% set content = content.split('</think>')[-1] %}{% endif %}"
    "{{ '<｜Assistant｜>' + content + '<｜end▁of▁sentence｜>' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{% if add_generation_prompt %}{{ '<｜Assistant｜>' }}{% endif %}"
)


@dataclass(frozen=True)
class Shape:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    rope_theta: float
    rms_eps: float = 1e-6
    context: int = 4096
    # Llama-3.1 RoPE scaling (None = plain RoPE).
    rope_scaling: dict | None = field(default=None)

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


# hidden and intermediate are multiples of 256 so every matrix can be Q4_K /
# Q6_K (K-quants need cols % 256 == 0; otherwise llama-quantize silently falls
# back per tensor and the test would not test what it says).
SHAPES = {
    ("qwen2", "tiny"): Shape(256, 2, 4, 2, 512, 2048, 10000.0),
    ("llama", "tiny"): Shape(256, 2, 4, 2, 512, 2048, 500000.0, rms_eps=1e-5),
    # DeepSeek-R1-Distill-Qwen-1.5B.
    ("qwen2", "r1-1.5b"): Shape(1536, 28, 12, 2, 8960, 151936, 10000.0, context=131072),
    # Same sizes under the Llama architecture (bench comparison only).
    ("llama", "r1-1.5b"): Shape(1536, 28, 12, 2, 8960, 151936, 10000.0, context=131072),
}

LLAMA3_SCALING_TINY = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}


def shape_for(arch: str, shape: str, rope_scaling: bool = False) -> Shape:
    try:
        s = SHAPES[(arch, shape)]
    except KeyError:
        raise SystemExit(f"make_gguf: no shape {shape!r} for arch {arch!r}; known: {sorted(SHAPES)}") from None
    if rope_scaling:
        if arch != "llama":
            raise SystemExit("make_gguf: --rope-scaling is a Llama-3.1 feature (arch llama)")
        s = replace(s, rope_scaling=LLAMA3_SCALING_TINY)
    return s


# ---------------------------------------------------------------- vocabulary


def byte_alphabet() -> list[str]:
    """GPT-2's bytes_to_unicode, in its id order (printable bytes first)."""
    printable = [b for b in range(256) if 33 <= b <= 126 or 0xA1 <= b <= 0xAC or 0xAE <= b <= 0xFF]
    rest = [b for b in range(256) if b not in printable]
    return [chr(b) for b in printable] + [chr(256 + i) for i in range(len(rest))]


def build_vocab(vocab: int) -> tuple[list[str], list[str], list[int]]:
    """Tokens, merges and GGUF token types for a byte-level BPE of `vocab` ids.

    Every merge "a b" has a and b in the vocabulary and a+b as a new token, as
    HF tokenizers requires. Deterministic; independent of the seed."""
    base = byte_alphabet()
    n_plain = vocab - len(SPECIAL_TOKENS)
    if n_plain < len(base):
        raise SystemExit(f"make_gguf: vocab {vocab} is smaller than the 256 byte tokens + specials")
    tokens = list(base)
    seen = set(tokens)
    merges: list[str] = []
    # First every pair of letters/digits ("he", "ll", ... so text tokenises
    # into merged tokens), then each token so far extended by each byte.
    alnum = sorted((c for c in base if c.isascii() and c.isalnum()), key=lambda c: (not c.islower(), c))

    def candidates():
        for left in alnum:
            for right in alnum:
                yield left, right
        i = len(base)
        while True:
            for right in base:
                yield tokens[i], right
            i += 1

    for left, right in candidates():
        if len(tokens) >= n_plain:
            break
        new = left + right
        if new in seen:
            continue
        seen.add(new)
        tokens.append(new)
        merges.append(f"{left} {right}")
    types = [gguf.TokenType.NORMAL] * len(tokens)
    for content, special in SPECIAL_TOKENS:
        tokens.append(content)
        types.append(gguf.TokenType.CONTROL if special else gguf.TokenType.USER_DEFINED)
    return tokens, merges, [int(t) for t in types]


def special_id(vocab: int, content: str) -> int:
    return vocab - len(SPECIAL_TOKENS) + [c for c, _ in SPECIAL_TOKENS].index(content)


# ------------------------------------------------------------------- weights


def hf_tensor_shapes(arch: str, s: Shape) -> list[tuple[str, tuple[int, ...]]]:
    """HF names and shapes ((out, in) for matrices), in checkpoint order."""
    kv = s.kv_heads * s.head_dim
    out = [("model.embed_tokens.weight", (s.vocab, s.hidden))]
    for n in range(s.layers):
        p = f"model.layers.{n}."
        out += [
            (p + "input_layernorm.weight", (s.hidden,)),
            (p + "self_attn.q_proj.weight", (s.hidden, s.hidden)),
            (p + "self_attn.k_proj.weight", (kv, s.hidden)),
            (p + "self_attn.v_proj.weight", (kv, s.hidden)),
        ]
        if arch == "qwen2":
            out += [
                (p + "self_attn.q_proj.bias", (s.hidden,)),
                (p + "self_attn.k_proj.bias", (kv,)),
                (p + "self_attn.v_proj.bias", (kv,)),
            ]
        out += [
            (p + "self_attn.o_proj.weight", (s.hidden, s.hidden)),
            (p + "post_attention_layernorm.weight", (s.hidden,)),
            (p + "mlp.gate_proj.weight", (s.intermediate, s.hidden)),
            (p + "mlp.up_proj.weight", (s.intermediate, s.hidden)),
            (p + "mlp.down_proj.weight", (s.hidden, s.intermediate)),
        ]
    out += [("model.norm.weight", (s.hidden,)), ("lm_head.weight", (s.vocab, s.hidden))]
    return out


def hf_tensor(seed: int, name: str, shape: tuple[int, ...]) -> np.ndarray:
    """The tensor `name`, F32, from its own stream (order independent).

    Scales keep activations O(1) through the layers (std 1/sqrt(fan_in) for
    matrices), norms near 1 and biases small; the output head's rows get
    log-normal scales so the greedy choice is rarely a near-tie."""
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    rng = np.random.default_rng(int.from_bytes(digest[:8], "little"))
    if name.endswith("norm.weight"):
        return (1.0 + 0.1 * rng.standard_normal(shape, dtype=np.float32)).astype(np.float32)
    if name.endswith(".bias"):
        return (0.2 * rng.standard_normal(shape, dtype=np.float32)).astype(np.float32)
    if name == "model.embed_tokens.weight":
        return rng.standard_normal(shape, dtype=np.float32)
    std = 1.0 / math.sqrt(shape[1])
    if "q_proj" in name or "k_proj" in name:
        std *= 2.0  # sharper attention than a uniform average
    w = (std * rng.standard_normal(shape, dtype=np.float32)).astype(np.float32)
    if name == "lm_head.weight":
        # Rows scaled log-normally: heavy-tailed logits, so the top-1 stands
        # out (with i.i.d. Gaussian logits over 2048 ids the top-1/top-2 gap
        # is ~0.26 std on average and near-ties are common, which makes
        # greedy comparisons between two correct implementations fragile).
        w *= np.exp(rng.standard_normal((shape[0], 1), dtype=np.float32))
    return w


def llama_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel.permute (HF rotate-half → GGUF interleaved)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_name(hf: str) -> str:
    fixed = {
        "model.embed_tokens.weight": "token_embd.weight",
        "model.norm.weight": "output_norm.weight",
        "lm_head.weight": "output.weight",
    }
    if hf in fixed:
        return fixed[hf]
    parts = hf.split(".")  # model.layers.N.<module>.<proj>.<kind>
    n, rest = parts[2], ".".join(parts[3:])
    table = {
        "input_layernorm.weight": "attn_norm.weight",
        "post_attention_layernorm.weight": "ffn_norm.weight",
        "self_attn.q_proj.weight": "attn_q.weight",
        "self_attn.k_proj.weight": "attn_k.weight",
        "self_attn.v_proj.weight": "attn_v.weight",
        "self_attn.q_proj.bias": "attn_q.bias",
        "self_attn.k_proj.bias": "attn_k.bias",
        "self_attn.v_proj.bias": "attn_v.bias",
        "self_attn.o_proj.weight": "attn_output.weight",
        "mlp.gate_proj.weight": "ffn_gate.weight",
        "mlp.up_proj.weight": "ffn_up.weight",
        "mlp.down_proj.weight": "ffn_down.weight",
    }
    return f"blk.{n}.{table[rest]}"


def to_gguf_tensor(arch: str, s: Shape, hf: str, w: np.ndarray) -> np.ndarray:
    if arch == "llama" and hf.endswith("self_attn.q_proj.weight"):
        return llama_permute(w, s.heads)
    if arch == "llama" and hf.endswith("self_attn.k_proj.weight"):
        return llama_permute(w, s.kv_heads)
    return w


def llama3_rope_factors(s: Shape) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel rope_freqs for rope_type llama3."""
    sc = s.rope_scaling
    assert sc is not None
    base, dim = s.rope_theta, s.head_dim
    freqs = 1.0 / (base ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
    factor = sc["factor"]
    low_freq_wavelen = sc["original_max_position_embeddings"] / sc["low_freq_factor"]
    high_freq_wavelen = sc["original_max_position_embeddings"] / sc["high_freq_factor"]
    factors = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < high_freq_wavelen:
            factors.append(1)
        elif wavelen > low_freq_wavelen:
            factors.append(factor)
        else:
            smooth = (sc["original_max_position_embeddings"] / wavelen - sc["low_freq_factor"]) / (
                sc["high_freq_factor"] - sc["low_freq_factor"]
            )
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(factors, dtype=np.float32)


# ---------------------------------------------------------------- writers


def write_gguf(path: Path, arch: str, s: Shape, seed: int, ftype: str) -> Path:
    """GGUF F32 or F16, streamed tensor by tensor, written under a temporary
    name and renamed when complete."""
    assert ftype in ("f32", "f16")
    tokens, merges, types = build_vocab(s.vocab)
    tmp = path.with_name(path.name + ".tmp")
    w = gguf.GGUFWriter(tmp, arch)
    w.add_name(f"moat-random-{arch}-{seed}")
    w.add_context_length(s.context)
    w.add_embedding_length(s.hidden)
    w.add_block_count(s.layers)
    w.add_feed_forward_length(s.intermediate)
    w.add_head_count(s.heads)
    w.add_head_count_kv(s.kv_heads)
    w.add_rope_dimension_count(s.head_dim)
    w.add_rope_freq_base(s.rope_theta)
    w.add_layer_norm_rms_eps(s.rms_eps)
    w.add_vocab_size(s.vocab)
    w.add_file_type(gguf.LlamaFileType.ALL_F32 if ftype == "f32" else gguf.LlamaFileType.MOSTLY_F16)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2" if arch == "qwen2" else "llama-bpe")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(special_id(s.vocab, BOS))
    w.add_eos_token_id(special_id(s.vocab, EOS))
    w.add_pad_token_id(special_id(s.vocab, PAD))
    w.add_add_bos_token(True)
    w.add_chat_template(CHAT_TEMPLATE)

    plan: list[tuple[str, str | None, tuple[int, ...], np.dtype]] = []
    if s.rope_scaling is not None:
        plan.append(("rope_freqs.weight", None, (s.head_dim // 2,), np.dtype(np.float32)))
    for hf, shape in hf_tensor_shapes(arch, s):
        dt = np.dtype(np.float16) if (ftype == "f16" and len(shape) == 2) else np.dtype(np.float32)
        plan.append((gguf_name(hf), hf, shape, dt))
    for name, _, shape, dt in plan:
        w.add_tensor_info(name, shape, dt, int(np.prod(shape)) * dt.itemsize)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for name, hf, shape, dt in plan:
        if hf is None:
            arr = llama3_rope_factors(s)
        else:
            arr = to_gguf_tensor(arch, s, hf, hf_tensor(seed, hf, shape)).astype(dt)
        w.write_tensor_data(np.ascontiguousarray(arr))
    w.close()
    os.replace(tmp, path)
    return path


def write_safetensors(path: Path, tensors: list[tuple[str, np.ndarray]]) -> None:
    """safetensors by hand (8-byte header length, JSON header, raw data): the
    format is that small, and it avoids a dependency."""
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, arr in tensors:
        assert arr.dtype == np.float32
        header[name] = {"dtype": "F32", "shape": list(arr.shape), "data_offsets": [offset, offset + arr.nbytes]}
        offset += arr.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for _, arr in tensors:
            f.write(np.ascontiguousarray(arr).tobytes())
    os.replace(tmp, path)


def tokenizer_json(vocab: int) -> dict:
    tokens, merges, _ = build_vocab(vocab)
    n_plain = vocab - len(SPECIAL_TOKENS)
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": True}
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [
            {
                "id": special_id(vocab, c),
                "content": c,
                "single_word": False,
                "lstrip": False,
                "rstrip": False,
                "normalized": False,
                "special": special,
            }
            for c, special in SPECIAL_TOKENS
        ],
        "normalizer": None,
        "pre_tokenizer": byte_level,
        "post_processor": byte_level,
        "decoder": byte_level,
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": False,
            "byte_fallback": False,
            "ignore_merges": False,
            "vocab": {t: i for i, t in enumerate(tokens[:n_plain])},
            "merges": merges,
        },
    }


def write_hf(out: Path, arch: str, s: Shape, seed: int) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    bos, eos, pad = special_id(s.vocab, BOS), special_id(s.vocab, EOS), special_id(s.vocab, PAD)
    config = {
        "architectures": ["Qwen2ForCausalLM" if arch == "qwen2" else "LlamaForCausalLM"],
        "model_type": arch,
        "attention_dropout": 0.0,
        "bos_token_id": bos,
        "eos_token_id": eos,
        "hidden_act": "silu",
        "hidden_size": s.hidden,
        "initializer_range": 0.02,
        "intermediate_size": s.intermediate,
        "max_position_embeddings": s.context,
        "num_attention_heads": s.heads,
        "num_hidden_layers": s.layers,
        "num_key_value_heads": s.kv_heads,
        "rms_norm_eps": s.rms_eps,
        "rope_theta": s.rope_theta,
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
        "transformers_version": "4.44.0",
        "use_cache": True,
        "vocab_size": s.vocab,
    }
    if arch == "qwen2":
        config.update(
            {"max_window_layers": s.layers, "sliding_window": s.context, "use_sliding_window": False, "use_mrope": False}
        )
    else:
        config.update({"attention_bias": False, "mlp_bias": False, "pretraining_tp": 1, "head_dim": s.head_dim})
        config["rope_scaling"] = s.rope_scaling
    generation = {
        "_from_model_config": True,
        "bos_token_id": bos,
        "eos_token_id": eos,
        "do_sample": True,
        "temperature": 0.6,
        "top_p": 0.95,
        "transformers_version": "4.44.0",
    }

    def added(content: str) -> dict:
        return {"__type": "AddedToken", "content": content, "lstrip": False, "normalized": True,
                "rstrip": False, "single_word": False}

    tok_config = {
        "add_bos_token": True,
        "add_eos_token": False,
        "bos_token": added(BOS),
        "clean_up_tokenization_spaces": False,
        "eos_token": added(EOS),
        "legacy": True,
        "model_max_length": 16384,
        "pad_token": added(PAD),
        "sp_model_kwargs": {},
        "unk_token": None,
        "tokenizer_class": "LlamaTokenizerFast",
        "chat_template": CHAT_TEMPLATE,
    }
    for name, value in [
        ("config.json", config),
        ("generation_config.json", generation),
        ("tokenizer_config.json", tok_config),
        ("tokenizer.json", tokenizer_json(s.vocab)),
    ]:
        (out / name).write_text(json.dumps(value, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    tensors = [(hf, hf_tensor(seed, hf, shape)) for hf, shape in hf_tensor_shapes(arch, s)]
    write_safetensors(out / "model.safetensors", tensors)
    return out


def quantize(llama_quantize: Path, src: Path, dst: Path, qtype: str) -> Path:
    """`llama-quantize src dst QTYPE` (llama.cpp's own quantiser), atomically."""
    tmp = dst.with_name(dst.name + ".tmp")
    r = subprocess.run(
        [str(llama_quantize), "--allow-requantize", str(src), str(tmp), qtype],
        capture_output=True,
        text=True,
    )
    if r.returncode != 0:
        raise RuntimeError(f"llama-quantize {src} -> {qtype} failed ({r.returncode}):\n{r.stdout[-2000:]}{r.stderr[-4000:]}")
    os.replace(tmp, dst)
    return dst


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", choices=["qwen2", "llama"], required=True)
    ap.add_argument("--shape", choices=["tiny", "r1-1.5b"], default="tiny")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--rope-scaling", action="store_true", help="Llama-3.1 rope scaling (rope_freqs.weight)")
    ap.add_argument("--formats", default="f32,f16,hf", help="comma list of f32, f16, hf")
    a = ap.parse_args()
    s = shape_for(a.arch, a.shape, a.rope_scaling)
    a.out.mkdir(parents=True, exist_ok=True)
    for f in a.formats.split(","):
        if f in ("f32", "f16"):
            print(write_gguf(a.out / f"model-{f}.gguf", a.arch, s, a.seed, f))
        elif f == "hf":
            print(write_hf(a.out / "hf", a.arch, s, a.seed))
        else:
            raise SystemExit(f"make_gguf: unknown format {f!r} (f32, f16, hf)")


if __name__ == "__main__":
    main()
