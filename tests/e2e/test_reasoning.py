"""DeepSeek-R1 output through the official `openai` SDK, on a *scripted*
model: real weights in a real safetensors file that the real engine runs,
built so that greedy decoding follows a chosen token chain.

How the script works: every layer's matrices are zero, so the residual
stream carries the token's embedding unchanged to the output head. Head row
`s` is the embedding of the token that must precede `s`, so the top logit
after token `t` is the script's successor of `t` (embeddings are random
Gaussian vectors: a token's own dot product, ≈ 128, towers over the others,
≈ ±35 at three sigma). The chain starts at the last prompt token (the
newline after `<think>` in R1's generation prompt), runs through reasoning
words, `</think>`, answer words, and the end-of-sequence token.

Also served: the demo model as one GGUF file (`moat demo-model --gguf q8_0`),
whose tokenizer and chat template come from the file's own metadata.
"""

import json
import os
import random
import signal
import socket
import struct
import subprocess
import time
import urllib.request
from array import array

import openai
import pytest

from moat_bin import moat_binary

REASONING = ["Ġsky", "Ġlight", "Ġscatter", "Ġblue"]  # preferred; any unused words do
ANSWER_WORDS = 4
REASONING_WORDS = 4


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_safetensors(path, tensors):
    """tensors: name -> (shape, array('f')). F32, little-endian."""
    header, offset, blobs = {"__metadata__": {"format": "pt"}}, 0, []
    for name, (shape, data) in tensors.items():
        raw = data.tobytes()
        header[name] = {"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + len(raw)]}
        offset += len(raw)
        blobs.append(raw)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for b in blobs:
            f.write(b)


def scripted_model(demo_dir, out_dir):
    """Turn the tiny demo model in `demo_dir` into the scripted model in
    `out_dir`; returns (reasoning text, answer text) it will produce."""
    os.makedirs(out_dir)
    config = json.load(open(os.path.join(demo_dir, "config.json")))
    tok = json.load(open(os.path.join(demo_dir, "tokenizer.json")))
    vocab = tok["model"]["vocab"]
    inv = {i: t for t, i in vocab.items()}
    # R1's current template opens the reasoning block in the prompt itself.
    tcfg = json.load(open(os.path.join(demo_dir, "tokenizer_config.json")))
    tcfg["chat_template"] = tcfg["chat_template"].replace(
        "{{ '<｜Assistant｜>' }}{% endif %}", "{{ '<｜Assistant｜><think>\\n' }}{% endif %}")
    assert "<think>\\n" in tcfg["chat_template"]
    for name in ("tokenizer.json", "generation_config.json"):
        with open(os.path.join(demo_dir, name), "rb") as src, open(os.path.join(out_dir, name), "wb") as dst:
            dst.write(src.read())
    json.dump(tcfg, open(os.path.join(out_dir, "tokenizer_config.json"), "w"))
    json.dump(config, open(os.path.join(out_dir, "config.json"), "w"))

    # Words: "Ġ" + lowercase letters, distinct, never the start token.
    words = [t for t in vocab if t.startswith("Ġ") and t[1:].isalpha() and t[1:].islower() and len(t) > 3]
    chosen = [w for w in REASONING if w in vocab]
    rest = [w for w in words if w not in chosen]
    chosen += rest[: REASONING_WORDS - len(chosen)]
    answer = [w for w in rest if w not in chosen][:ANSWER_WORDS]
    start = vocab["Ċ"]  # "\n", the last token of "<think>\n"
    eos = config["eos_token_id"]
    chain = [start] + [vocab[w] for w in chosen] + [vocab["</think>"]] + [vocab[w] for w in answer] + [eos]
    assert len(set(chain)) == len(chain)

    h, v, layers = config["hidden_size"], config["vocab_size"], config["num_hidden_layers"]
    kv = config["num_key_value_heads"] * h // config["num_attention_heads"]
    inter = config["intermediate_size"]
    rng = random.Random(7)
    embed = array("f", (rng.gauss(0.0, 1.0) for _ in range(v * h)))
    head = array("f", bytes(4 * v * h))
    for prev, nxt in zip(chain, chain[1:]):
        head[nxt * h:(nxt + 1) * h] = embed[prev * h:(prev + 1) * h]

    def zeros(*shape):
        n = 1
        for d in shape:
            n *= d
        return (list(shape), array("f", bytes(4 * n)))

    def ones(n):
        return ([n], array("f", [1.0]) * n)

    tensors = {"model.embed_tokens.weight": ([v, h], embed)}
    for i in range(layers):
        p = f"model.layers.{i}"
        tensors.update({
            f"{p}.self_attn.q_proj.weight": zeros(h, h), f"{p}.self_attn.q_proj.bias": zeros(h),
            f"{p}.self_attn.k_proj.weight": zeros(kv, h), f"{p}.self_attn.k_proj.bias": zeros(kv),
            f"{p}.self_attn.v_proj.weight": zeros(kv, h), f"{p}.self_attn.v_proj.bias": zeros(kv),
            f"{p}.self_attn.o_proj.weight": zeros(h, h),
            f"{p}.mlp.gate_proj.weight": zeros(inter, h), f"{p}.mlp.up_proj.weight": zeros(inter, h),
            f"{p}.mlp.down_proj.weight": zeros(h, inter),
            f"{p}.input_layernorm.weight": ones(h), f"{p}.post_attention_layernorm.weight": ones(h),
        })
    tensors["model.norm.weight"] = ones(h)
    tensors["lm_head.weight"] = ([v, h], head)
    write_safetensors(os.path.join(out_dir, "model.safetensors"), tensors)

    def text(tokens):
        return "".join(t.replace("Ġ", " ") for t in tokens)

    return text(chosen), text(answer)


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("reasoning")
    binary = moat_binary()
    demo, gguf = tmp / "demo", tmp / "gguf"
    subprocess.run([binary, "demo-model", str(demo)], check=True, capture_output=True)
    subprocess.run([binary, "demo-model", "--gguf", "q8_0", str(gguf)], check=True, capture_output=True)
    assert sorted(os.listdir(gguf)) == ["model.gguf"]
    reasoning, answer = scripted_model(str(demo), str(tmp / "scripted"))
    home = tmp / "home"
    for src, name in ((tmp / "scripted", "r1"), (gguf, "r1-gguf")):
        subprocess.run([binary, "pull", "--store", str(home), f"file://{src}", "--name", name],
                       check=True, capture_output=True)
    port, mport = free_port(), free_port()
    config = tmp / "moat.toml"
    config.write_text(f"""
home = "{home}"
keys_file = "{tmp / 'keys.json'}"
[inference]
listen = "127.0.0.1:{port}"
[metrics]
listen = "127.0.0.1:{mport}"
[[models]]
name = "r1"
[[models]]
name = "r1-gguf"
""")
    created = subprocess.run([binary, "keys", "create", "--role", "user", "--keys-file", str(tmp / "keys.json")],
                             capture_output=True, text=True, check=True)
    api_key = created.stdout.split()[0]
    log = open(tmp / "moat.log", "w")
    proc = subprocess.Popen([binary, "serve", "--config", str(config)], stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 60
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as r:
                if r.status == 200:
                    break
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail("moat did not start: " + (tmp / "moat.log").read_text()[-3000:])
        time.sleep(0.1)
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=api_key, max_retries=0, timeout=60)
    assert sorted(m.id for m in client.models.list()) == ["r1", "r1-gguf"], (tmp / "moat.log").read_text()[-3000:]
    yield {"client": client, "reasoning": reasoning, "answer": answer}
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0
    log.close()


def test_sdk_streams_reasoning_content_then_content(stack):
    stream = stack["client"].chat.completions.create(
        model="r1", messages=[{"role": "user", "content": "Why is the sky blue?"}],
        max_tokens=32, temperature=0, stream=True)
    order, reasoning, content, finish = [], "", "", None
    for chunk in stream:
        if not chunk.choices:
            continue
        d = chunk.choices[0].delta
        r = getattr(d, "reasoning_content", None) or (d.model_extra or {}).get("reasoning_content")
        if r:
            reasoning += r
            order.append("reasoning")
        if d.content:
            content += d.content
            order.append("content")
        finish = chunk.choices[0].finish_reason or finish
    assert order and order[0] == "reasoning", order
    assert order == sorted(order, key=lambda k: k == "content"), f"reasoning after content: {order}"
    assert reasoning.strip() == stack["reasoning"].strip()
    assert content.strip() == stack["answer"].strip()
    assert "</think>" not in content and "<think>" not in reasoning
    assert finish == "stop"


def test_non_streamed_answer_splits_reasoning_and_can_hide_it(stack):
    client = stack["client"]
    msg = [{"role": "user", "content": "Why is the sky blue?"}]
    r = client.chat.completions.create(model="r1", messages=msg, max_tokens=32, temperature=0)
    m = r.choices[0].message
    assert (m.model_extra or {}).get("reasoning_content", "").strip() == stack["reasoning"].strip()
    assert m.content.strip() == stack["answer"].strip()
    assert r.choices[0].finish_reason == "stop"
    hidden = client.chat.completions.create(model="r1", messages=msg, max_tokens=32, temperature=0,
                                            extra_body={"include_reasoning": False})
    assert not (hidden.choices[0].message.model_extra or {}).get("reasoning_content")
    assert hidden.choices[0].message.content.strip() == stack["answer"].strip()
    assert hidden.usage.completion_tokens == r.usage.completion_tokens, "reasoning is still generated and counted"


def test_stop_string_cuts_the_scripted_answer(stack):
    words = stack["answer"].split()
    stop = words[1][:2] + words[1][2:]  # the second answer word, whole
    r = stack["client"].chat.completions.create(
        model="r1", messages=[{"role": "user", "content": "Why?"}], max_tokens=32, temperature=0, stop=[stop])
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].message.content.strip() == words[0]


def test_gguf_model_serves_with_its_own_vocabulary_and_template(stack):
    r = stack["client"].chat.completions.create(
        model="r1-gguf", messages=[{"role": "user", "content": "Why is the sky blue?"}],
        max_tokens=8, temperature=0)
    # Prompt tokens come from the GGUF's vocabulary and chat template: the
    # same count the safetensors demo (tokenizer.json) gives this prompt.
    assert r.usage.prompt_tokens > 5
    assert r.usage.completion_tokens >= 1
    assert r.choices[0].finish_reason in ("stop", "length")
