"""Greedy tokens equal Hugging Face transformers' on tiny random checkpoints, in every engine mode."""
import random

import pytest

from nanovllm.testing import PROMPT_LENS, make_prompts
from nanovllm import LLM, SamplingParams

MODES = {
    "default": dict(),
    "no-prefix-cache": dict(enable_prefix_caching=False),
    "preemption": dict(num_kvcache_blocks=12, max_model_len=96),  # 96 slots for 6 requests of up to 69 tokens
    "chunked-prefill": dict(max_num_batched_tokens=16, max_num_seqs=4),
    "sync-scheduling": dict(async_scheduling=False),
    "sync-preemption": dict(async_scheduling=False, num_kvcache_blocks=12, max_model_len=96),
    "no-chunked-prefill": dict(enable_chunked_prefill=False, max_num_batched_tokens=128, max_num_seqs=8),
    "long-prefill-threshold": dict(long_prefill_token_threshold=8),
}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("model", ["qwen3", "qwen2", "llama2", "llama3"])
def test_greedy_matches_hf(model, mode, tiny_checkpoint, assert_matches_hf):
    path = tiny_checkpoint(model)
    llm = LLM(path, **{"kvcache_block_size": 8, "max_model_len": 128, **MODES[mode]})
    prompts = make_prompts()
    outputs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True), use_tqdm=False)
    assert [len(o["token_ids"]) for o in outputs] == [24] * len(prompts)
    assert_matches_hf(path, prompts, outputs)
    if "preemption" in mode:
        assert llm.scheduler.num_preemptions > 0
    if mode == "chunked-prefill":
        assert llm.config.max_num_batched_tokens < max(PROMPT_LENS)
    llm.exit()


@pytest.mark.parametrize("model", ["qwen3", "llama3"])
def test_prefix_cache_hits_give_hf_tokens(model, tiny_checkpoint, assert_matches_hf):
    path = tiny_checkpoint(model)
    llm = LLM(path, kvcache_block_size=8, max_model_len=128)
    rng = random.Random(1)
    shared = [rng.randrange(512) for _ in range(24)]
    prompts = [shared + [rng.randrange(512) for _ in range(n)] for n in (1, 5, 13)]
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    first = llm.generate(prompts[:1], params, use_tqdm=False)
    second = llm.generate(prompts, params, use_tqdm=False)
    assert first[0]["token_ids"] == second[0]["token_ids"]
    assert [o["num_cached_tokens"] for o in second] == [24, 24, 24]  # the 3 shared full blocks
    assert_matches_hf(path, prompts, second)
    llm.exit()


@pytest.mark.parametrize("model", ["qwen3", "qwen2", "llama3"])
def test_tensor_parallel_2_matches_hf(model, tiny_checkpoint, assert_matches_hf):
    path = tiny_checkpoint(model)
    llm = LLM(path, tensor_parallel_size=2, kvcache_block_size=8, max_model_len=128)
    prompts = make_prompts(2)
    outputs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=16, ignore_eos=True), use_tqdm=False)
    assert_matches_hf(path, prompts, outputs)
    llm.exit()


def test_checker_flags_wrong_tokens(tiny_checkpoint):
    """The HF agreement check itself must fail on tokens that are not the argmax."""
    from nanovllm.testing import hf_greedy_mismatches
    path = tiny_checkpoint("qwen3")
    llm = LLM(path, kvcache_block_size=8, max_model_len=128)
    prompts = make_prompts()[:2]
    outputs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True), use_tqdm=False)
    llm.exit()
    corrupted = [[(t + 1) % 512 for t in o["token_ids"]] for o in outputs]
    assert hf_greedy_mismatches(path, prompts, corrupted)
