"""The official `openai` Python client against `freeski-bot serve` (run by tests/serve_openai.rs,
which starts the server and passes everything through the environment):

- models.list(), a non-streamed and a streamed chat completion on the base model, both equal to
  what `freeski-bot ask` printed for the same question, seed and settings;
- an adapter loaded through the API, listed, and answering `model=<adapter>` exactly as
  `freeski-bot ask --adapter` did; unloading it makes the name unknown again (404);
- a wrong key gets 401, an oversized body 413, a full queue 429 with Retry-After.

Exits non-zero with the reason on the first failed check.
"""

import json
import os
import sys
import threading
import time
import urllib.request

import openai
from openai import OpenAI

T0 = time.time()
def step(what):
    print(f"{time.time() - T0:6.1f} s  {what}", flush=True)

URL = os.environ["SERVE_URL"] + "/v1"
KEY = os.environ["SERVE_KEY"]
BASE = os.environ["SERVE_BASE_MODEL"]
QUESTION = os.environ["SERVE_QUESTION"]
SEED = int(os.environ["SERVE_SEED"])
TEMPERATURE = float(os.environ["SERVE_TEMPERATURE"])
MAX_TOKENS = int(os.environ["SERVE_MAX_TOKENS"])
ADAPTER_PATH = os.environ["SERVE_ADAPTER_PATH"]
EXPECTED_BASE = open(os.environ["SERVE_EXPECTED_BASE"], encoding="utf-8").read()
EXPECTED_ADAPTER = open(os.environ["SERVE_EXPECTED_ADAPTER"], encoding="utf-8").read()
MAX_BODY = int(os.environ["SERVE_MAX_BODY"])
LONG_PROMPT = os.environ["SERVE_LONG_PROMPT"]
LONG_SEED = int(os.environ["SERVE_LONG_SEED"])

client = OpenAI(base_url=URL, api_key=KEY, max_retries=0, timeout=300)


def check(cond, what):
    if not cond:
        print(f"FAILED: {what}", file=sys.stderr)
        sys.exit(1)


def ask(model, stream):
    args = dict(model=model, messages=[{"role": "user", "content": QUESTION}], seed=SEED, temperature=TEMPERATURE, max_tokens=MAX_TOKENS)
    if not stream:
        r = client.chat.completions.create(**args)
        check(r.object == "chat.completion" and len(r.choices) == 1, f"one choice: {r}")
        check(r.choices[0].finish_reason in ("stop", "length"), f"finish_reason: {r.choices[0].finish_reason}")
        check(r.usage.completion_tokens > 0 and r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens, f"usage: {r.usage}")
        check(r.model == model, f"model echoed: {r.model}")
        return r.choices[0].message.content
    text, reasons, usage = "", [], None
    for chunk in client.chat.completions.create(**args, stream=True, stream_options={"include_usage": True}):
        check(chunk.object == "chat.completion.chunk", f"chunk object: {chunk}")
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            text += c.delta.content or ""
            if c.finish_reason:
                reasons.append(c.finish_reason)
    check(reasons in (["stop"], ["length"]), f"one finish reason: {reasons}")
    check(usage is not None and usage.completion_tokens > 0, f"usage chunk: {usage}")
    return text


# The model list: the base only, to begin with.
ids = [m.id for m in client.models.list()]
check(ids == [BASE], f"models.list(): {ids}")

step('models listed')
# The base model, whole and streamed: what `ask` printed.
whole = ask(BASE, stream=False)
check(whole == EXPECTED_BASE, f"non-streamed answer differs from `ask`:\n{whole!r}\n{EXPECTED_BASE!r}")
streamed = ask(BASE, stream=True)
check(streamed == EXPECTED_BASE, f"streamed answer differs from `ask`:\n{streamed!r}\n{EXPECTED_BASE!r}")

step('base answers')
# An adapter loaded by API answers as `ask --adapter` does.
try:
    client.chat.completions.create(model="lora-a", messages=[{"role": "user", "content": QUESTION}])
    check(False, "an unknown model must be refused")
except openai.NotFoundError as e:
    check(e.status_code == 404 and e.code == "model_not_found", f"unknown model: {e}")
# vLLM's endpoint, through the client's own request path (auth, errors): a plain-text answer.
r = client.post("/load_lora_adapter", body={"lora_name": "lora-a", "lora_path": ADAPTER_PATH}, cast_to=str)
check("lora-a" in r, f"load_lora_adapter: {r}")
ids = [m.id for m in client.models.list()]
check(ids == [BASE, "lora-a"], f"models.list() after loading: {ids}")
with_adapter = ask("lora-a", stream=True)
check(with_adapter == EXPECTED_ADAPTER, f"adapter answer differs from `ask --adapter`:\n{with_adapter!r}\n{EXPECTED_ADAPTER!r}")
check(with_adapter != whole, "the adapter changes the answer")
try:
    client.post("/load_lora_adapter", body={"lora_name": "bad", "lora_path": "/no/such/adapter"}, cast_to=str)
    check(False, "a missing adapter folder must be refused")
except openai.BadRequestError as e:
    check("/no/such/adapter" in str(e), f"missing adapter: {e}")
r = client.post("/unload_lora_adapter", body={"lora_name": "lora-a"}, cast_to=str)
check("lora-a" in r, f"unload_lora_adapter: {r}")
check([m.id for m in client.models.list()] == [BASE], "unloaded adapter still listed")

step('adapter answers')
# A wrong key: 401.
try:
    OpenAI(base_url=URL, api_key="wrong-" + KEY, max_retries=0).models.list()
    check(False, "a wrong key must be refused")
except openai.AuthenticationError as e:
    check(e.status_code == 401, f"wrong key: {e}")

# A body over the limit: 413.
try:
    client.chat.completions.create(model=BASE, messages=[{"role": "user", "content": "x" * (MAX_BODY + 1)}])
    check(False, "an oversized body must be refused")
except openai.APIStatusError as e:
    check(e.status_code == 413, f"oversized body: {e.status_code} {e}")

step('401, 413')
# A full queue: one long answer holds the only batch row, one request waits in the only queue
# slot, the next gets 429 with Retry-After.
long = client.chat.completions.create(model=BASE, messages=[{"role": "user", "content": LONG_PROMPT}], seed=LONG_SEED, max_tokens=400, stream=True)
first = next(iter(long))
check(first.choices[0].delta.role == "assistant", f"first chunk: {first}")
def metric(name):
    with urllib.request.urlopen(os.environ["SERVE_URL"] + "/metrics") as r:
        for line in r.read().decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
# The role chunk is sent before the engine takes the request: wait until the long answer holds
# the batch row and the queue is empty again, or the next request could be the one refused.
deadline = time.time() + 60
while metric("freeski_running_requests") < 1 or metric("freeski_queue_depth") > 0:
    check(time.time() < deadline, f"the long answer never started: running {metric('freeski_running_requests')}, queued {metric('freeski_queue_depth')}")
    time.sleep(0.02)
waiting = {}
def queued():
    try:
        waiting["r"] = client.chat.completions.create(model=BASE, messages=[{"role": "user", "content": QUESTION}], max_tokens=4)
    except Exception as e:  # reported below
        waiting["e"] = e
t = threading.Thread(target=queued)
t.start()
deadline = time.time() + 60
while metric("freeski_queue_depth") < 1:
    check(time.time() < deadline, "the second request never queued")
    time.sleep(0.02)
try:
    client.chat.completions.create(model=BASE, messages=[{"role": "user", "content": QUESTION}], max_tokens=4)
    check(False, "a request beyond the queue must be refused")
except openai.RateLimitError as e:
    check(e.status_code == 429 and e.response.headers.get("retry-after") == "1", f"full queue: {e} {e.response.headers}")
more = [c for _, c in zip(range(3), long)]
check(len(more) == 3 and all(c.choices and c.choices[0].finish_reason is None for c in more), f"the long answer goes on: {more}")
long.close()  # the client leaves: its generation is cancelled and the queued request runs
t.join(120)
check("r" in waiting, f"the queued request was answered: {waiting.get('e')}")
check(metric("freeski_rejected_queue_full_total") >= 1 and metric("freeski_unauthorized_total") >= 1, "metrics count refusals")
step("429")
print("openai client checks passed")
