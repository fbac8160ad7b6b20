"""fa1 on a GPU, in fp16 as on Turing: greedy tokens against Hugging Face, and fresh prefills through
flash_attn_unpadded_func against torch SDPA. On the sm90 machines here fa1 is asked for by name."""
import pytest
import torch

from nanovllm.testing import GPU_MODES, GPU_TINY, check_gpu_greedy_matches_hf

pytestmark = pytest.mark.gpu
GPU_TINY = {**GPU_TINY, "dtype": torch.float16}


@pytest.mark.parametrize("mode", GPU_MODES)
@pytest.mark.parametrize("model", ["qwen3", "qwen2", "llama3"])
def test_greedy_matches_hf_fp16(model, mode, tiny_checkpoint):
    check_gpu_greedy_matches_hf(tiny_checkpoint(model, **GPU_TINY), mode, "fa1", torch.float16)


def test_fresh_prefill_uses_flash_attn_1(tiny_checkpoint, monkeypatch):
    """A batch of fresh prompts goes through flash_attn_unpadded_func, a prefix-cached one through Triton."""
    from nanovllm import LLM, SamplingParams
    llm = LLM(tiny_checkpoint("qwen3", **GPU_TINY), attention_backend="fa1", max_model_len=2048, enforce_eager=True)
    backend = llm.model_runner.attention_layers[0].backend
    calls = []
    for name in ("_unpadded", "_paged"):
        real = getattr(backend, name)
        monkeypatch.setattr(backend, name, lambda *a, _real=real, _name=name, **k: calls.append(_name) or _real(*a, **k))
    prompt = list(range(300))
    llm.generate([prompt], SamplingParams(temperature=0, max_tokens=2), use_tqdm=False)
    assert calls[0] == "_unpadded" and "_paged" in calls  # prefill, then decode
    calls.clear()
    llm.generate([prompt + [7]], SamplingParams(temperature=0, max_tokens=1), use_tqdm=False)
    assert calls[0] == "_paged"  # 256 cached tokens: the new ones attend to the paged cache
    llm.exit()
