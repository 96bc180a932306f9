"""The Mistral-7B-Instruct-v0.1 shape with random bf16 weights on the GPU: the model the PyTorch
baselines (`pytorch_generate.py`, `pytorch_train.py`) compare `freeski-bot bench --random
mistral-7b` against, and (saved with the real Mistral tokenizer) the checkpoint llama.cpp's
converter and the bitsandbytes QLoRA stack load.

    python3 bench/mistral_shape.py DIR     # save it as a Hugging Face checkpoint in DIR
"""
import json
import os
import shutil
import sys

import torch
from transformers import MistralConfig, MistralForCausalLM

TOKENIZER = "tests/fixtures/tokenizers/mistral-7b-v0.1.tokenizer.json"


def config():
    return MistralConfig(
        vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, rms_norm_eps=1e-5, rope_theta=10000.0,
        sliding_window=4096, max_position_embeddings=32768, tie_word_embeddings=False,
    )


def random_mistral_7b():
    torch.manual_seed(0)
    with torch.device("cuda"):
        return MistralForCausalLM(config()).to(torch.bfloat16)


def save(out):
    """Write the random model (seed 0, bf16) and the real Mistral tokenizer to `out`, through a
    temporary folder so that an interrupted save never passes for a finished one."""
    if os.path.isfile(os.path.join(out, "config.json")):
        return
    part = out + ".part"
    shutil.rmtree(part, ignore_errors=True)
    model = random_mistral_7b()
    model.save_pretrained(part, safe_serialization=True, max_shard_size="4GB")
    del model
    shutil.copy(TOKENIZER, os.path.join(part, "tokenizer.json"))
    with open(os.path.join(part, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "LlamaTokenizerFast", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
                   "add_bos_token": True, "add_eos_token": False, "model_max_length": 32768}, f)
    shutil.rmtree(out, ignore_errors=True)
    os.rename(part, out)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python3 bench/mistral_shape.py DIR")
    save(sys.argv[1])
