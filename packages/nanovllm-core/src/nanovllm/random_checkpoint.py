"""Make a local Hugging Face checkpoint with random weights and a small tokenizer, offline.

Used by ``nanovllm bench`` when no model is given and by the tests; nothing is downloaded.
"""
import os

import torch

# Qwen3-0.6B's shape; its real vocabulary size too, so the LM head costs what it does in practice.
QWEN3_0_6B = dict(hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
                  num_key_value_heads=8, head_dim=128, vocab_size=151936, max_position_embeddings=40960,
                  tie_word_embeddings=True, rms_norm_eps=1e-6)
SMALL = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=8,
             num_key_value_heads=2, head_dim=32, vocab_size=10240, max_position_embeddings=4096,
             tie_word_embeddings=True, rms_norm_eps=1e-6)

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
_CORPUS = ("The quick brown fox jumps over the lazy dog. A paged KV cache stores keys and values in blocks. "
           "Continuous batching schedules many requests at once; prefix caching reuses shared prompt blocks. "
           "Hello, world! 0123456789 user assistant system")


def make_tokenizer(vocab_size: int = 400):
    """A byte-level BPE tokenizer (any text encodes) with a chat template, trained on a tiny corpus."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator([_CORPUS] * 4, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def make_random_checkpoint(path: str, architecture: str = "Qwen3ForCausalLM", dtype: torch.dtype = torch.bfloat16,
                           seed: int = 0, **config_overrides) -> str:
    """Write config.json, model.safetensors and a tokenizer for ``architecture`` with random weights."""
    from transformers import AutoConfig, AutoModelForCausalLM
    model_type = {"Qwen3ForCausalLM": "qwen3", "Qwen2ForCausalLM": "qwen2", "LlamaForCausalLM": "llama",
                  "MixtralForCausalLM": "mixtral", "Qwen2MoeForCausalLM": "qwen2_moe",
                  "Qwen3MoeForCausalLM": "qwen3_moe"}[architecture]
    tokenizer = make_tokenizer(min(400, config_overrides.get("vocab_size", SMALL["vocab_size"])))
    options = {**SMALL, **config_overrides}
    options.setdefault("eos_token_id", tokenizer.eos_token_id)
    config = AutoConfig.for_model(model_type, architectures=[architecture], **options)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).to(dtype)
    os.makedirs(path, exist_ok=True)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
