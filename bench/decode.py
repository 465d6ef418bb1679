"""Time streamed chat completions against a running moat: time to first
token (first content or reasoning delta) and decode rate (tokens after the
first, over the time after the first), medians over runs after one warm-up.
The API key comes from OPENAI_API_KEY, never argv."""

import argparse
import statistics
import time

import openai

PROMPTS = {
    "short": "Explain in one paragraph why a moat protects a castle.",
    "long": " ".join(["The castle stands on a hill above the river, and its moat is wide and deep."] * 24),
}


def one(client, model, prompt, max_tokens):
    t0 = time.perf_counter()
    first = last = None
    usage = None
    stream = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": prompt}],
        max_tokens=max_tokens,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    for chunk in stream:
        now = time.perf_counter()
        if chunk.usage is not None:
            usage = chunk.usage
        if chunk.choices:
            d = chunk.choices[0].delta
            if d.content or getattr(d, "reasoning_content", None):
                first = first or now
                last = now
    assert usage is not None and first is not None
    n = usage.completion_tokens
    decode = (n - 1) / (last - first) if n > 1 and last > first else float("nan")
    return first - t0, decode, usage.prompt_tokens, n


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--base-url", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--max-tokens", type=int, default=64)
    a = ap.parse_args()
    client = openai.OpenAI(base_url=a.base_url, timeout=600)
    for name, prompt in PROMPTS.items():
        one(client, a.model, prompt, 4)  # warm-up
        res = [one(client, a.model, prompt, a.max_tokens) for _ in range(a.runs)]
        ttft = statistics.median(r[0] for r in res)
        dec = statistics.median(r[1] for r in res)
        print(
            f"{a.model:<22} prompt={name:<5} ({res[0][2]:>3} tokens)  "
            f"TTFT median {ttft * 1000:8.1f} ms  decode median {dec:7.2f} tok/s  "
            f"({a.runs} runs x {res[0][3]} tokens)",
            flush=True,
        )


if __name__ == "__main__":
    main()
