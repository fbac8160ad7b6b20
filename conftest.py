"""Shared test fixtures: tiny random checkpoints, the Hugging Face greedy-agreement check, and
Triton kernels run by Triton's CPU interpreter."""
import os
import subprocess
import sys

import pytest
import torch

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


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU: run on the GPU machine (tools/device_run.sh)")
    for item in items:
        if "gpu" in item.keywords or "multi_gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """tiny_checkpoint(name, **overrides) -> path of a cached tiny random fp32 checkpoint."""
    from nanovllm.random_checkpoint import make_random_checkpoint
    made = {}

    def make(name: str = "qwen3", dtype=torch.float32, **overrides):
        key = (name, str(dtype), tuple(sorted((k, repr(v)) for k, v in overrides.items())))
        if key not in made:
            architecture, arch_overrides = TINY_MODELS[name]
            path = str(tmp_path_factory.mktemp(name))
            made[key] = make_random_checkpoint(path, architecture, dtype=dtype, **{**TINY, **arch_overrides, **overrides})
        return made[key]
    return make


def hf_greedy_mismatches(path: str, prompts: list[list[int]], outputs: list[list[int]], tol: float = 1e-3,
                         device: str = "cpu", dtype=torch.float32, noise_dtype=None, router_tol: float = 0.0) -> list[str]:
    """Teacher-force Hugging Face transformers on prompt + our tokens; list every token that is not HF's argmax.

    A token whose HF logit is within ``tol`` of the maximum is a numerical near-tie and allowed. MoE models in
    bf16 have two more kinds of near-tie: with ``noise_dtype`` the margin grows, position by position, by how
    much the two logits move between HF's own two precisions; with ``router_tol`` a token may differ where some
    layer's k-th and (k+1)-th router logits are that close (a rounding difference flips an expert there).
    """
    from transformers import AutoModelForCausalLM
    models = [AutoModelForCausalLM.from_pretrained(path, dtype=d).to(device).eval()
              for d in ([dtype] if noise_dtype is None else [dtype, noise_dtype])]
    top_k = getattr(models[0].config, "num_experts_per_tok", 0)
    problems = []
    for i, (prompt, output) in enumerate(zip(prompts, outputs)):
        assert output, f"prompt {i} produced no tokens"
        ids = torch.tensor([prompt + output[:-1]], device=device)
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


@pytest.fixture
def assert_matches_hf():
    def check(path, prompts, outputs, **kwargs):
        problems = hf_greedy_mismatches(path, prompts, [o["token_ids"] for o in outputs], **kwargs)
        assert not problems, "greedy tokens differ from Hugging Face:\n" + "\n".join(problems)
    return check


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
    "preemption": dict(num_kvcache_blocks=5, max_model_len=1024),
    "no-prefix-cache": dict(enable_prefix_caching=False),
}


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
    problems = hf_greedy_mismatches(path, prompts + prompts[-2:], [o["token_ids"] for o in outputs + again],
                                    tol=tol, device="cuda", dtype=dtype, **near_ties)
    assert not problems, "\n".join(problems)
