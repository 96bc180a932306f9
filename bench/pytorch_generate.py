"""PyTorch + transformers baseline for `freeski-bot bench generate --random mistral-7b`.

Same shapes (Mistral-7B-Instruct-v0.1 config), random weights in bf16 on one GPU, same
measurements: prefill tokens/s for a 512-token prompt, time to first token for a 100-token
prompt, greedy decode tokens/s at batch 1. With --lora-rank R, a PEFT LoRA adapter of rank R on
all seven projections is active (unmerged, as `bench generate --lora-rank R` runs it). Prints
one JSON object.

    python3 bench/pytorch_generate.py --prompt-tokens 512 --ttft-tokens 100 --decode-tokens 128
    python3 bench/pytorch_generate.py --lora-rank 16    # needs peft (bench/gpu-suite.sh installs its wheel)
"""
import argparse
import json
import time

import torch

from mistral_shape import random_mistral_7b


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--ttft-tokens", type=int, default=100)
    ap.add_argument("--decode-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--lora-rank", type=int, default=0)
    args = ap.parse_args()

    t0 = time.perf_counter()
    model = random_mistral_7b()
    cfg = model.config
    if args.lora_rank > 0:
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(
            r=args.lora_rank, lora_alpha=2 * args.lora_rank, lora_dropout=0.0, bias="none", task_type="CAUSAL_LM",
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        )
        model = get_peft_model(model, lora).to(torch.bfloat16)
    model.eval()
    torch.cuda.synchronize()
    load_s = time.perf_counter() - t0
    gen = torch.Generator(device="cuda").manual_seed(1)

    def ids(n):
        return torch.randint(3, cfg.vocab_size, (1, n), device="cuda", generator=gen)

    def median(xs):
        xs = sorted(xs)
        return xs[len(xs) // 2]

    with torch.inference_mode():
        model(ids(16))  # warm-up
        prefill, ttft, decode = [], [], []
        for _ in range(args.repeats):
            x = ids(args.prompt_tokens)
            torch.cuda.synchronize(); t = time.perf_counter()
            model(x, use_cache=False, logits_to_keep=1)
            torch.cuda.synchronize(); prefill.append(time.perf_counter() - t)
        for _ in range(args.repeats):
            x = ids(args.ttft_tokens)
            torch.cuda.synchronize(); t = time.perf_counter()
            out = model(x, logits_to_keep=1)
            out.logits[0, -1].argmax().item()
            ttft.append(time.perf_counter() - t)
        for _ in range(args.repeats):
            x = ids(32)
            # generate() includes one prefill; subtract a separately timed one.
            torch.cuda.synchronize(); t = time.perf_counter()
            model.generate(x, max_new_tokens=1, min_new_tokens=1, do_sample=False)
            torch.cuda.synchronize(); one = time.perf_counter() - t
            t = time.perf_counter()
            model.generate(x, max_new_tokens=args.decode_tokens + 1, min_new_tokens=args.decode_tokens + 1, do_sample=False)
            torch.cuda.synchronize(); decode.append(time.perf_counter() - t - one)
    print(json.dumps({
        "stack": f"PyTorch {torch.__version__} + transformers, bf16, random Mistral-7B shape"
        + (f", PEFT LoRA r={args.lora_rank} on all 7 projections" if args.lora_rank else ""),
        "device": torch.cuda.get_device_name(0),
        "load_s": load_s,
        "prefill_tokens_per_s": args.prompt_tokens / median(prefill),
        "ttft_ms": median(ttft) * 1e3,
        "decode_tokens_per_s": args.decode_tokens / median(decode),
        "peak_gpu_bytes": torch.cuda.max_memory_allocated(),
    }, indent=1))


if __name__ == "__main__":
    main()
