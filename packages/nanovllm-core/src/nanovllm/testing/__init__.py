"""What tests of nanovllm and of its plugins share: tiny checkpoints with random weights made offline (also
used by ``nanovllm bench``), the Hugging Face greedy-agreement check, and Triton kernels run on the CPU.

The pytest fixtures built on these (``tiny_checkpoint``, ``assert_matches_hf``) and the ``gpu`` marker's skip
come with nanovllm-core as a pytest plugin (``nanovllm.testing.pytest_plugin``). Nothing here downloads.
"""
import itertools
import json
import os
import subprocess
import sys
from dataclasses import dataclass

import torch

# Qwen3-0.6B's shape; its real vocabulary size too, so the LM head costs what it does in practice.
QWEN3_0_6B = dict(hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
                  num_key_value_heads=8, head_dim=128, vocab_size=151936, max_position_embeddings=40960,
                  tie_word_embeddings=True, rms_norm_eps=1e-6)
QWEN3_8B = dict(hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
                num_key_value_heads=8, head_dim=128, vocab_size=151936, max_position_embeddings=40960,
                tie_word_embeddings=False, rms_norm_eps=1e-6)
SMALL = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=8,
             num_key_value_heads=2, head_dim=32, vocab_size=10240, max_position_embeddings=4096,
             tie_word_embeddings=True, rms_norm_eps=1e-6)

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n"
                 "{% if enable_thinking is defined and not enable_thinking %}<think>\n\n</think>\n\n{% endif %}"
                 "{% endif %}")  # Qwen3's thinking switch
_CORPUS = ("The quick brown fox jumps over the lazy dog. A paged KV cache stores keys and values in blocks. "
           "Continuous batching schedules many requests at once; prefix caching reuses shared prompt blocks. "
           "Hello, world! 0123456789 user assistant system")


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` exists and is not a zombie (a zombie whose parent is gone may never be reaped)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def make_tokenizer(vocab_size: int = 400):
    """A byte-level BPE tokenizer (any text encodes) with a chat template, trained on a tiny corpus to at most 400
    tokens; past those, made-up words fill the vocabulary to ``vocab_size``, so every id a model of that vocabulary
    samples decodes to text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=min(vocab_size, 400), special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator([_CORPUS] * 4, trainer)
    if vocab_size > tokenizer.get_vocab_size():
        data = json.loads(tokenizer.to_str())
        vocab = data["model"]["vocab"]
        words = ("\u0120" + "".join(chr(ord("a") + int(d)) for d in str(n)) for n in itertools.count())  # " abc"
        for word in words:
            if len(vocab) == vocab_size:
                break
            vocab.setdefault(word, len(vocab))
        tokenizer = Tokenizer.from_str(json.dumps(data))
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
    tokenizer = make_tokenizer(config_overrides.get("vocab_size", SMALL["vocab_size"]))
    options = {**SMALL, **config_overrides}
    options.setdefault("eos_token_id", tokenizer.eos_token_id)
    config = AutoConfig.for_model(model_type, architectures=[architecture], **options)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).to(dtype)
    os.makedirs(path, exist_ok=True)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, vocab_size=512, max_position_embeddings=512,
            initializer_range=0.5)
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64, "rope_theta": 500000.0}
# name -> (architecture, config overrides); Qwen2 gets qkv biases, Llama 3 its rope scaling.
TINY_MODELS = {
    "qwen3": ("Qwen3ForCausalLM", {}),
    "qwen2": ("Qwen2ForCausalLM", {}),
    "llama2": ("LlamaForCausalLM", {}),
    "llama3": ("LlamaForCausalLM", {"rope_scaling": LLAMA3_ROPE}),
    # MoE: 4 experts, top 2; Qwen2-MoE keeps layer 0 dense and adds its gated shared expert.
    "mixtral": ("MixtralForCausalLM", {"num_local_experts": 4, "num_experts_per_tok": 2}),
    "qwen2_moe": ("Qwen2MoeForCausalLM", {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
                                          "shared_expert_intermediate_size": 48, "mlp_only_layers": [0]}),
    "qwen3_moe": ("Qwen3MoeForCausalLM", {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
                                          "norm_topk_prob": True}),
}


# Prompts of 1 token to several 8-token blocks; GQA (4 query heads over 2 KV heads) in every tiny model.
PROMPT_LENS = (1, 7, 8, 9, 30, 45)


def make_prompts(seed: int = 0) -> list[list[int]]:
    import random
    rng = random.Random(seed)
    return [[rng.randrange(512) for _ in range(n)] for n in PROMPT_LENS]


def hf_greedy_mismatches(path: str, prompts: list[list[int]], outputs: list[list[int]], tol: float = 1e-3,
                         device: str = "cpu", dtype=torch.float32, noise_dtype=None, router_tol: float = 0.0,
                         dropped: list[torch.Tensor | None] | None = None) -> list[str]:
    """Teacher-force Hugging Face transformers on prompt + our tokens; list every token that is not HF's argmax.

    A token whose HF logit is within ``tol`` of the maximum is a numerical near-tie and allowed. MoE models in
    bf16 have two more kinds of near-tie: with ``noise_dtype`` the margin grows, position by position, by how
    much the two logits move between HF's own two precisions; with ``router_tol`` a token may differ where some
    layer's k-th and (k+1)-th router logits are that close (a rounding difference flips an expert there).

    ``dropped[i]`` names the KV entries that a retention policy dropped from prompt i: Hugging Face's attention
    then hides them from every query after the prompt. It is None (nothing dropped), bool [layers, kv_heads,
    len(prompt)], or a function ``(layer, query, key, scale) -> bool [kv_heads, len(prompt)]`` that computes them
    from Hugging Face's own query [1, heads, tokens, dim] and key [1, kv_heads, tokens, dim] (after rotary).
    """
    from transformers import AttentionInterface, AutoModelForCausalLM
    AttentionInterface.register("nanovllm_dropped_kv", _attention_without_dropped_kv)
    implementation = {"attn_implementation": "nanovllm_dropped_kv"} if dropped is not None else {}
    models = [AutoModelForCausalLM.from_pretrained(path, dtype=d, **implementation).to(device).eval()
              for d in ([dtype] if noise_dtype is None else [dtype, noise_dtype])]
    top_k = getattr(models[0].config, "num_experts_per_tok", 0)
    problems = []
    for i, (prompt, output) in enumerate(zip(prompts, outputs)):
        assert output, f"prompt {i} produced no tokens"
        ids = torch.tensor([prompt + output[:-1]], device=device)
        _dropped_kv[:] = [] if dropped is None or dropped[i] is None else [dropped[i]]
        with torch.no_grad():
            result = models[0](ids, **({"output_router_logits": True} if router_tol else {}))
            logits = result.logits[0, len(prompt) - 1:].float()
            other = models[1](ids).logits[0, len(prompt) - 1:].float() if noise_dtype is not None else logits
        noise = (logits - other).abs()
        if router_tol:
            top = torch.stack([r.float().topk(top_k + 1, dim=-1).values for r in result.router_logits])
            router_tie = ((top[..., top_k - 1] - top[..., top_k]).min(0).values < router_tol)[len(prompt) - 1:]
        for j, token in enumerate(output):
            best, argmax = logits[j].max().item(), logits[j].argmax().item()
            margin = tol + noise[j, token].item() + noise[j, argmax].item()
            if logits[j, token].item() < best - margin and not (router_tol and router_tie[j]):
                problems.append(f"prompt {i} token {j}: got {token} (logit {logits[j, token]:.5f}), "
                                f"HF argmax {argmax} (logit {best:.5f}), allowed margin {margin:.3f}")
    return problems


def blocks_held_per_step(llm, prompt: list[int], params) -> tuple:
    """Run one request alone, step by step: (its sequence, the KV blocks in use after each step)."""
    manager = llm.scheduler.block_manager
    seq = llm.add_request(prompt, params)
    held = []
    while not llm.is_finished():
        llm.step()
        held.append(len(manager.blocks) - manager.num_free_blocks)
    return seq, held


_dropped_kv: list = []  # the prompt's dropped KV entries (mask or function) while hf_greedy_mismatches runs it


def _attention_without_dropped_kv(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Eager causal attention for one sequence (query [1, heads, q, dim], key and value [1, kv_heads, k, dim])
    where queries after the prompt do not see the prompt's KV entries in ``_dropped_kv``."""
    group = query.size(1) // key.size(1)
    num_q, num_k = query.size(2), key.size(2)
    visible = torch.ones(query.size(1), num_q, num_k, dtype=torch.bool, device=query.device).tril(num_k - num_q)
    if _dropped_kv:
        spec = _dropped_kv[0]
        dropped = spec(module.layer_idx, query, key, scaling) if callable(spec) else spec[module.layer_idx]
        dropped = dropped.to(query.device).repeat_interleave(group, 0)  # [heads, prompt]
        prompt = dropped.size(1)
        visible[:, prompt:, :prompt] &= ~dropped.unsqueeze(1)
    key, value = key.repeat_interleave(group, 1), value.repeat_interleave(group, 1)
    scores = (query.float() @ key.float().transpose(-1, -2)) * scaling
    probs = scores.masked_fill(~visible, float("-inf")).softmax(dim=-1)
    return (probs @ value.float()).to(query.dtype).transpose(1, 2).contiguous(), probs


def run_interpreted(path: str, function: str, *args):
    """Run ``function(*args)`` from the file ``path`` in a fresh Python with TRITON_INTERPRET=1, so Triton
    kernels run on the CPU (Triton reads the setting when first imported: a switch in-process is unreliable)."""
    code = f"import runpy; runpy.run_path({path!r})[{function!r}](*{args!r})"
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]


# GPU agreement runs: tiny checkpoints with a head size every flash-attn build has (64), GQA 2:1.
GPU_TINY = dict(hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                max_position_embeddings=2048, initializer_range=0.1)
# MoE: 8 experts, top 2; expert sizes that are not a multiple of the grouped kernel's tiles on purpose (96).
GPU_MOE = {
    "mixtral": dict(num_local_experts=8, num_experts_per_tok=2, intermediate_size=96),
    "qwen2_moe": dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=96,
                      shared_expert_intermediate_size=160),
    "qwen3_moe": dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=96),
}
GPU_MODES = {
    "cuda-graphs": dict(),
    "eager": dict(enforce_eager=True),
    "chunked-prefill": dict(max_num_batched_tokens=256, max_num_seqs=8),
    "long-prefill-threshold": dict(long_prefill_token_threshold=64),  # mixed steps of a few dozen tokens, in graphs
    "preemption": dict(num_kvcache_blocks=5, max_model_len=1024),
    "no-prefix-cache": dict(enable_prefix_caching=False),
    # prompts over 204 tokens keep their first 4 and last 200: decode graphs attend over the kept slots
    "kv-retention": dict(kv_retention="recent", kv_keep_first=4, kv_keep_last=200),
}


def recent_dropped(path: str, prompts: list[list[int]], first: int, last: int) -> list[torch.Tensor | None]:
    """For each prompt, what the ``recent`` policy drops (bool [layers, kv_heads, len], or None when it keeps
    all): hf_greedy_mismatches's ``dropped``."""
    from transformers import AutoConfig
    config = AutoConfig.from_pretrained(path)
    masks = []
    for prompt in prompts:
        if len(prompt) <= first + last:
            masks.append(None)
            continue
        dropped = torch.zeros(config.num_hidden_layers, config.num_key_value_heads, len(prompt), dtype=torch.bool)
        dropped[:, :, first:len(prompt) - last] = True
        masks.append(dropped)
    return masks


def check_gpu_greedy_matches_hf(path: str, mode: str, backend: str, dtype: torch.dtype, tol: float = 0.1,
                                **near_ties):
    """Greedy tokens of ``backend`` in ``mode`` against Hugging Face in ``dtype`` on the GPU, with prompts of
    1 token to several 256-token blocks and a shared prefix generated twice (prefix-cache hits)."""
    import random

    from nanovllm import LLM, SamplingParams
    llm = LLM(path, **{"max_model_len": 2048, "attention_backend": backend, "dtype": str(dtype).removeprefix("torch."),
                       **GPU_MODES[mode]})
    rng = random.Random(0)
    shared = [rng.randrange(512) for _ in range(300)]
    prompts = [[rng.randrange(512) for _ in range(n)] for n in (1, 100, 256, 300, 700)]
    prompts += [shared + [rng.randrange(512) for _ in range(n)] for n in (5, 200)]
    params = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
    outputs = llm.generate(prompts, params, use_tqdm=False)
    again = llm.generate(prompts[-2:], params, use_tqdm=False)
    prefix_caching, num_preemptions = llm.config.enable_prefix_caching, llm.scheduler.num_preemptions
    llm.exit()  # before any assertion, so that a failure leaves the GPU's memory to the next test
    if prefix_caching:
        assert all(o["num_cached_tokens"] >= 256 for o in again)
    if mode == "preemption":
        assert num_preemptions > 0
    options = GPU_MODES[mode]
    dropped = None
    if options.get("kv_retention") == "recent":
        dropped = recent_dropped(path, prompts + prompts[-2:], options["kv_keep_first"], options["kv_keep_last"])
    problems = hf_greedy_mismatches(path, prompts + prompts[-2:], [o["token_ids"] for o in outputs + again],
                                    tol=tol, device="cuda", dtype=dtype, dropped=dropped, **near_ties)
    assert not problems, "\n".join(problems)


@dataclass(frozen=True)
class RetrievalTask:
    """Synthetic retrieval, to judge what a KV-retention policy keeps: ``num_needles`` needles among random filler
    tokens, each a key token followed by a value of ``value_len`` digit tokens (distinct keys); then a question
    (``query`` and one of the keys) answered by that needle's value. The prompt ends with the question, so all but
    the value's first digit are computed after a retention policy thinned the prompt's KV, and come out right
    only if the needle was kept. Random weights cannot show which KV entries matter; a small model trained on this
    task can (tools/train_retrieval_model.py)."""

    bos: int = 1
    query: int = 3
    filler: tuple[int, int] = (10, 100)  # token id ranges, end excluded
    keys: tuple[int, int] = (100, 164)
    digits: tuple[int, int] = (200, 216)
    num_needles: int = 4
    value_len: int = 4

    @property
    def min_length(self) -> int:
        """The shortest prompt that holds every needle."""
        return 3 + (self.value_len + 1) * self.num_needles

    def batch(self, size: int, length: int, generator: torch.Generator,
              num_questions: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """(tokens, values): each row is a ``length``-token prompt that ends in a question, then that question's
        value and ``num_questions - 1`` more questions each with its value (but the very last digit); values
        [size, num_questions, value_len]. Question i's key is at ``length - 1 + (value_len + 2) * i``."""
        device = generator.device
        rows = torch.arange(size, device=device).unsqueeze(1)
        span = self.value_len + 1

        def random_order(n):  # a random permutation of range(n) per row
            return torch.rand(size, n, generator=generator, device=device).argsort(dim=1)
        body = torch.randint(*self.filler, (size, length - 3), generator=generator, device=device)
        keys = self.keys[0] + random_order(self.keys[1] - self.keys[0])[:, :self.num_needles]
        values = torch.randint(*self.digits, (size, self.num_needles, self.value_len), generator=generator,
                               device=device)
        starts = span * random_order((length - 3) // span)[:, :self.num_needles]  # needles never overlap
        body[rows, starts] = keys
        for digit in range(self.value_len):
            body[rows, starts + 1 + digit] = values[:, :, digit]
        asked = random_order(self.num_needles)[:, :num_questions]
        values = values[rows, asked]
        questions = torch.cat([torch.full((size, num_questions, 1), self.query, device=device),
                               keys.gather(1, asked).unsqueeze(2), values], dim=2).flatten(1)
        tokens = torch.cat([torch.full((size, 1), self.bos, device=device), body, questions[:, :-1]], dim=1)
        return tokens, values


def retrieval_accuracy(llm, task: RetrievalTask, length: int, num_prompts: int, seed: int = 0) -> float:
    """Share of ``num_prompts`` questions (``length``-token prompts, seeded) whose whole value ``llm`` gives, greedy."""
    from nanovllm import SamplingParams
    tokens, values = task.batch(num_prompts, length, torch.Generator().manual_seed(seed))
    params = SamplingParams(temperature=0, max_tokens=task.value_len, ignore_eos=True)
    outputs = llm.generate(tokens[:, :length].tolist(), params, use_tqdm=False)
    return sum(o["token_ids"] == value for o, value in zip(outputs, values[:, 0].tolist())) / num_prompts
