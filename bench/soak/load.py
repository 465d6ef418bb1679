"""Load generator for the soak bench (bench/soak/run.sh): mixed traffic
against a running moat, with asyncio + httpx (no C load tool can vary the
credentials per request and count each kind's statuses).

Traffic mix, by weight:
  valid        chat completion with an unlimited key (plain or streamed),
               and GET /v1/models                               → 200
  unauth       no key, or a key that does not exist             → 401
  over_limit   chat with a key whose role has a tight
               requests/min limit                               → 200 or 429

`peak`: closed loop, CONCURRENCY clients sending the mix back to back for
SECONDS; prints completed requests per second.
`soak`: open loop at RATE requests/s for SECONDS (a request is started on
schedule whether or not earlier ones finished, so a slow server shows up
as latency and errors, not as a politely lower rate); samples the server's
resident memory from /proc every SAMPLE seconds; prints a JSON summary.

Keys come from the environment (SOAK_KEY, SOAK_LIMITED_KEY), never argv.
"""

import argparse
import asyncio
import json
import os
import random
import statistics
import sys
import time

import httpx

BODY = {"model": "tiny", "max_tokens": 8, "temperature": 0,
        "messages": [{"role": "user", "content": "Why do castles have moats?"}]}
MIX = [("valid_chat", 50), ("valid_stream", 10), ("valid_models", 10),
       ("unauth_none", 8), ("unauth_bad", 7), ("over_limit", 15)]
EXPECTED = {"valid_chat": {200}, "valid_stream": {200}, "valid_models": {200},
            "unauth_none": {401}, "unauth_bad": {401}, "over_limit": {200, 429}}


def pick(rng):
    kinds, weights = zip(*MIX)
    return rng.choices(kinds, weights)[0]


async def one(client, kind, keys, model):
    body = dict(BODY, model=model)
    headers = {}
    if kind in ("valid_chat", "valid_stream", "valid_models"):
        headers["Authorization"] = f"Bearer {keys['valid']}"
    elif kind == "over_limit":
        headers["Authorization"] = f"Bearer {keys['limited']}"
    elif kind == "unauth_bad":
        headers["Authorization"] = "Bearer moat_doesnotexist_0000000000000000000000"
    if kind == "valid_models":
        r = await client.get("/v1/models", headers=headers)
        return r.status_code, True
    if kind == "valid_stream":
        body["stream"] = True
        async with client.stream("POST", "/v1/chat/completions", json=body, headers=headers) as r:
            text = b"".join([c async for c in r.aiter_bytes()])
            complete = r.status_code != 200 or text.rstrip().endswith(b"data: [DONE]")
            return r.status_code, complete
    r = await client.post("/v1/chat/completions", json=body, headers=headers)
    return r.status_code, True


class Tally:
    def __init__(self):
        self.statuses = {}  # kind -> {status: n}
        self.latencies = []
        self.client_errors = 0
        self.incomplete_streams = 0
        self.sent = 0

    def add(self, kind, status, complete, latency):
        d = self.statuses.setdefault(kind, {})
        d[status] = d.get(status, 0) + 1
        if not complete:
            self.incomplete_streams += 1
        self.latencies.append(latency)

    def answered(self):
        return sum(sum(d.values()) for d in self.statuses.values())

    def unexpected(self):
        out = {}
        for kind, d in self.statuses.items():
            for status, n in d.items():
                if status not in EXPECTED[kind]:
                    out[f"{kind}:{status}"] = n
        return out

    def count_5xx(self):
        return sum(n for d in self.statuses.values() for s, n in d.items() if s >= 500)


async def timed(client, kind, keys, model, tally):
    tally.sent += 1
    t0 = time.perf_counter()
    try:
        status, complete = await one(client, kind, keys, model)
    except httpx.HTTPError as e:
        tally.client_errors += 1
        print(f"client error ({kind}): {type(e).__name__}: {e}", file=sys.stderr)
        return
    tally.add(kind, status, complete, time.perf_counter() - t0)


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def client_for(base_url, concurrency):
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    return httpx.AsyncClient(base_url=base_url, limits=limits, timeout=httpx.Timeout(60.0))


async def peak(args, keys):
    rng = random.Random(1)
    tally = Tally()
    deadline = time.perf_counter() + args.seconds
    async with client_for(args.base_url, args.concurrency) as client:
        async def worker():
            while time.perf_counter() < deadline:
                await timed(client, pick(rng), keys, args.model, tally)
        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(args.concurrency)))
        elapsed = time.perf_counter() - t0
    print(json.dumps({"rps": tally.answered() / elapsed, "answered": tally.answered(),
                      "client_errors": tally.client_errors, "statuses": tally.statuses,
                      "unexpected": tally.unexpected()}))


async def soak(args, keys):
    rng = random.Random(2)
    tally = Tally()
    samples = []  # (seconds since start, RSS KiB)
    start = time.perf_counter()
    stop = start + args.seconds

    async def sampler():
        while time.perf_counter() < stop:
            samples.append((round(time.perf_counter() - start, 1), rss_kib(args.pid)))
            await asyncio.sleep(args.sample)
        samples.append((round(time.perf_counter() - start, 1), rss_kib(args.pid)))

    # Enough connections that the open loop is never capped by the pool.
    async with client_for(args.base_url, args.max_in_flight) as client:
        sampling = asyncio.create_task(sampler())
        tasks = set()
        n = 0
        while True:
            due = start + n / args.rate
            if due >= stop:
                break
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            t = asyncio.create_task(timed(client, pick(rng), keys, args.model, tally))
            tasks.add(t)
            t.add_done_callback(tasks.discard)
            n += 1
        await asyncio.gather(*tasks)
        await sampling
    elapsed = time.perf_counter() - start
    warm = args.warmup
    after = [kib for t, kib in samples if t >= warm]
    window = max(1, len(after) // 5)
    # Baseline: the first fifth of the samples after warm-up; end: the last
    # fifth. Medians, so one sample taken mid-allocation does not decide.
    baseline = statistics.median(after[:window]) if after else None
    end = statistics.median(after[-window:]) if after else None
    lat = sorted(tally.latencies)
    q = lambda p: round(lat[min(len(lat) - 1, int(p * len(lat)))] * 1000, 1) if lat else None
    print(json.dumps({
        "seconds": round(elapsed, 1), "rate_target": args.rate,
        "sent": tally.sent, "answered": tally.answered(), "client_errors": tally.client_errors,
        "achieved_rps": round(tally.answered() / elapsed, 1),
        "statuses": tally.statuses, "unexpected": tally.unexpected(), "5xx": tally.count_5xx(),
        "incomplete_streams": tally.incomplete_streams,
        "latency_ms": {"p50": q(0.5), "p99": q(0.99), "max": q(1.0)},
        "rss_kib": {"baseline_after_warmup": baseline, "end": end,
                    "growth_pct": round((end - baseline) / baseline * 100, 2) if baseline else None,
                    "samples": samples},
    }))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=["peak", "soak"])
    ap.add_argument("--base-url", required=True)
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--seconds", type=float, required=True)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--rate", type=float)
    ap.add_argument("--pid", type=int)
    ap.add_argument("--sample", type=float, default=5.0)
    ap.add_argument("--warmup", type=float, default=60.0)
    ap.add_argument("--max-in-flight", type=int, default=256)
    args = ap.parse_args()
    keys = {"valid": os.environ["SOAK_KEY"], "limited": os.environ["SOAK_LIMITED_KEY"]}
    if args.mode == "peak":
        asyncio.run(peak(args, keys))
    else:
        if not (args.rate and args.pid):
            ap.error("soak needs --rate and --pid")
        asyncio.run(soak(args, keys))


if __name__ == "__main__":
    main()
