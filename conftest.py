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
}


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
                         device: str = "cpu", dtype=torch.float32) -> list[str]:
    """Teacher-force Hugging Face transformers on prompt + our tokens; list every token that is not HF's argmax.

    A token whose HF logit is within ``tol`` of the maximum is a numerical near-tie and allowed.
    """
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
    problems = []
    for i, (prompt, output) in enumerate(zip(prompts, outputs)):
        assert output, f"prompt {i} produced no tokens"
        ids = torch.tensor([prompt + output[:-1]], device=device)
        with torch.no_grad():
            logits = model(ids).logits[0, len(prompt) - 1:].float()
        for j, token in enumerate(output):
            best = logits[j].max().item()
            if logits[j, token].item() < best - tol:
                problems.append(f"prompt {i} token {j}: got {token} (logit {logits[j, token]:.5f}), "
                                f"HF argmax {logits[j].argmax().item()} (logit {best:.5f})")
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
