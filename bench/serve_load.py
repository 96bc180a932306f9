"""Load generator for any OpenAI-compatible chat endpoint (`freeski-bot serve`, llama.cpp's
llama-server, vLLM): N concurrent clients, each sending streamed chat completions back to back.
Reports aggregate generated tokens/s (all completion tokens / wall time from the first request
to the last answer) and the p50/p95 time to first token (request sent -> first text chunk).
Standard library only, so it runs wherever python3 does.

  python3 bench/serve_load.py --url http://127.0.0.1:8000 --model NAME --clients 1,8,32 \
      --requests 4 --max-tokens 128 [--key KEY] [--label freeski] [--json out.json]
"""

import argparse
import http.client
import json
import statistics
import sys
import threading
import time
import urllib.parse

PROMPTS = [
    "How do I land a switch 900 in the park?",
    "What wax should I use for spring slush?",
    "Any tips for skiing powder in tight trees?",
    "How should I pick the length of my first park skis?",
]


def one_request(url, key, model, prompt, max_tokens, timeout):
    """One streamed completion; returns (ttft seconds, completion tokens, total seconds)."""
    u = urllib.parse.urlparse(url)
    conn = http.client.HTTPConnection(u.hostname, u.port or 80, timeout=timeout)
    body = json.dumps({
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    })
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    t0 = time.perf_counter()
    conn.request("POST", (u.path.rstrip("/") or "") + "/v1/chat/completions", body, headers)
    resp = conn.getresponse()
    if resp.status != 200:
        raise RuntimeError(f"HTTP {resp.status}: {resp.read()[:300]!r}")
    ttft, chunks, usage = None, 0, None
    for raw in resp:
        line = raw.decode("utf-8", "replace").strip()
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        if data == "[DONE]":
            break
        msg = json.loads(data)
        if "error" in msg:
            raise RuntimeError(f"stream error: {msg['error']}")
        if msg.get("usage"):
            usage = msg["usage"]
        for c in msg.get("choices", []):
            if (c.get("delta") or {}).get("content"):
                chunks += 1
                if ttft is None:
                    ttft = time.perf_counter() - t0
    total = time.perf_counter() - t0
    conn.close()
    tokens = usage["completion_tokens"] if usage and usage.get("completion_tokens") else chunks
    return (ttft if ttft is not None else total), tokens, total


def run_level(args, clients):
    results, errors = [], []
    lock = threading.Lock()

    def client(i):
        for r in range(args.requests):
            prompt = PROMPTS[(i + r) % len(PROMPTS)]
            try:
                res = one_request(args.url, args.key, args.model, prompt, args.max_tokens, args.timeout)
                with lock:
                    results.append(res)
            except Exception as e:  # counted and reported, the run goes on
                with lock:
                    errors.append(str(e))

    # One warm-up request (first-use allocations, CUDA graph capture) outside the timing.
    one_request(args.url, args.key, args.model, PROMPTS[0], 8, args.timeout)
    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    ttfts = sorted(r[0] for r in results)
    tokens = sum(r[1] for r in results)

    def pct(p):
        if not ttfts:
            return float("nan")
        return ttfts[min(len(ttfts) - 1, int(round(p / 100 * (len(ttfts) - 1))))]

    return {
        "label": args.label,
        "clients": clients,
        "requests": len(results),
        "errors": len(errors),
        "first_error": errors[0] if errors else None,
        "completion_tokens": tokens,
        "mean_tokens_per_request": tokens / len(results) if results else 0,
        "wall_s": wall,
        "tokens_per_s": tokens / wall if wall > 0 else 0,
        "ttft_p50_ms": pct(50) * 1000,
        "ttft_p95_ms": pct(95) * 1000,
        "ttft_mean_ms": statistics.mean(ttfts) * 1000 if ttfts else float("nan"),
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", required=True, help="server root, e.g. http://127.0.0.1:8000")
    ap.add_argument("--model", required=True)
    ap.add_argument("--key", default="")
    ap.add_argument("--clients", default="1,8,32", help="comma-separated concurrency levels")
    ap.add_argument("--requests", type=int, default=4, help="requests per client per level")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--timeout", type=float, default=600)
    ap.add_argument("--label", default="server")
    ap.add_argument("--json", help="append one JSON object per level to this file")
    args = ap.parse_args()
    print(f"| server | clients | requests | errors | tokens/req | aggregate tok/s | TTFT p50 ms | TTFT p95 ms |")
    print(f"|---|---|---|---|---|---|---|---|")
    for n in [int(x) for x in args.clients.split(",") if x]:
        r = run_level(args, n)
        print(f"| {r['label']} | {n} | {r['requests']} | {r['errors']} | {r['mean_tokens_per_request']:.0f} | {r['tokens_per_s']:.1f} | {r['ttft_p50_ms']:.1f} | {r['ttft_p95_ms']:.1f} |", flush=True)
        if r["errors"]:
            print(f"  first error: {r['first_error']}", file=sys.stderr)
        if args.json:
            with open(args.json, "a") as f:
                f.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    main()
