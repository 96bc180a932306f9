"""PyTorch training peers for `freeski-bot bench train --random mistral-7b`, on one GPU.

Two stacks, both with PEFT LoRA on all seven projections (alpha 16, dropout 0.05), gradient
checkpointing (non-reentrant), bf16 autocast and the loss on every token:

- `--stack bf16` (default): the Mistral-7B shape with random bf16 weights held in bf16, LoRA
  weights and AdamW state in f32 (`torch.optim.AdamW`).
- `--stack qlora`: the prototype's stack, the one freeski-bot replaces. The random checkpoint
  saved by `mistral_shape.py` is loaded through transformers' bitsandbytes integration as NF4
  with double quantization and bf16 compute, prepared by PEFT's
  `prepare_model_for_kbit_training`, and trained with bitsandbytes' paged 8-bit AdamW
  (`PagedAdamW8bit`, what TRL's `optim="paged_adamw_8bit"` builds).

Times full optimizer steps (forward, backward, clipping, AdamW) after one warm-up step, in
training mode (`from_pretrained` returns eval mode, which silently turns gradient checkpointing
off), and prints one JSON object with tokens/s and peak memory.

    python3 bench/pytorch_train.py --seq 512 --batch 2 --rank 16 --steps 5
    python3 bench/pytorch_train.py --stack qlora --checkpoint /tmp/llamacpp/mistral-7b-random
"""
import argparse
import json
import time

import torch
from peft import LoraConfig, get_peft_model

from mistral_shape import random_mistral_7b


def bf16_model(args):
    model = random_mistral_7b()
    if not args.no_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def qlora_model(args):
    from peft import prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    if not args.checkpoint:
        raise SystemExit("--stack qlora needs --checkpoint DIR (python3 bench/mistral_shape.py DIR saves one)")
    nf4 = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )
    model = AutoModelForCausalLM.from_pretrained(args.checkpoint, quantization_config=nf4, dtype=torch.bfloat16, device_map={"": 0})
    return prepare_model_for_kbit_training(
        model, use_gradient_checkpointing=not args.no_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False},
    )


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--stack", choices=["bf16", "qlora"], default="bf16")
    ap.add_argument("--checkpoint", help="Hugging Face checkpoint of the random model (--stack qlora)")
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--no-checkpointing", action="store_true")
    ap.add_argument("--profile", action="store_true", help="print torch.profiler's GPU-time table for one extra step")
    args = ap.parse_args()

    free0, total = torch.cuda.mem_get_info()
    model = qlora_model(args) if args.stack == "qlora" else bf16_model(args)
    cfg = model.config
    model.config.use_cache = False
    lora = LoraConfig(
        r=args.rank, lora_alpha=16, lora_dropout=0.05, bias="none", task_type="CAUSAL_LM",
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    )
    model = get_peft_model(model, lora)
    trainable = [p for p in model.parameters() if p.requires_grad]
    for p in trainable:
        p.data = p.data.float()
    n_params = sum(p.numel() for p in trainable)
    if args.stack == "qlora":
        import bitsandbytes as bnb
        opt = bnb.optim.PagedAdamW8bit(trainable, lr=1e-4)
        framework = f"torch {torch.__version__} + peft + bitsandbytes {bnb.__version__} (NF4, paged AdamW 8-bit)"
    else:
        opt = torch.optim.AdamW(trainable, lr=1e-4)
        framework = f"torch {torch.__version__} + peft (bf16 base)"
    model.train()
    ids = torch.randint(3, cfg.vocab_size, (args.batch, args.seq), device="cuda")

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        loss = step()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    if args.profile:
        from torch.profiler import ProfilerActivity, profile
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            step()
            torch.cuda.synchronize()
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=40, max_name_column_width=70))
    times.sort()
    med = times[len(times) // 2]
    free1, _ = torch.cuda.mem_get_info()
    print(json.dumps({
        "framework": framework,
        "device": torch.cuda.get_device_name(0),
        "seq": args.seq, "batch": args.batch, "rank": args.rank,
        "checkpointing": not args.no_checkpointing, "trainable_params": n_params,
        "step_ms": med * 1e3, "tokens_per_s": args.batch * args.seq / med, "loss": loss,
        "max_memory_allocated_gib": torch.cuda.max_memory_allocated() / 2**30,
        "max_memory_reserved_gib": torch.cuda.max_memory_reserved() / 2**30,
        "device_used_at_end_gib": (total - free1) / 2**30,
        "device_used_before_model_gib": (total - free0) / 2**30,
    }))


if __name__ == "__main__":
    main()
