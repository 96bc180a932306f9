"""The Mistral-7B-Instruct-v0.1 shape with random bf16 weights on the GPU: the model both PyTorch
baselines (`pytorch_generate.py`, `pytorch_train.py`) compare `freeski-bot bench --random
mistral-7b` against."""
import torch
from transformers import MistralConfig, MistralForCausalLM


def random_mistral_7b():
    cfg = MistralConfig(
        vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, rms_norm_eps=1e-5, rope_theta=10000.0,
        sliding_window=4096, max_position_embeddings=32768, tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    with torch.device("cuda"):
        return MistralForCausalLM(cfg).to(torch.bfloat16)
