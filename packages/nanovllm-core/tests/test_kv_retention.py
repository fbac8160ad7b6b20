"""The KV-retention seam, proven with core's `recent` policy: once a prompt is computed only its first S and
last N tokens keep their K and V, later tokens keep their true positions, and the rest is freed in that step.

The reference is Hugging Face transformers with an attention function that hides exactly the dropped
entries from every query after the prompt (nanovllm.testing.hf_greedy_mismatches(dropped=...)).
"""
import pytest

from nanovllm import LLM, SamplingParams
from nanovllm.testing import blocks_held_per_step, make_prompts, recent_dropped

FIRST, LAST = 2, 5
OPTIONS = dict(kvcache_block_size=8, max_model_len=128, max_num_seqs=8, max_num_batched_tokens=64)
MODES = {
    "plain": dict(),
    "chunked-prefill": dict(max_num_batched_tokens=16),
    "preemption": dict(num_kvcache_blocks=8, max_model_len=64, max_num_seqs=4, max_num_batched_tokens=32),
    "tensor-parallel": dict(tensor_parallel_size=2),
}
GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


def assert_all_blocks_released(llm):
    manager = llm.scheduler.block_manager
    assert [b.block_id for b in manager.blocks if b.ref_count] == []
    assert manager.num_free_blocks == len(manager.blocks)


def generate(path, prompts, **options):
    llm = LLM(path, **{**OPTIONS, "kv_retention": "recent", "kv_keep_first": FIRST, "kv_keep_last": LAST, **options})
    try:
        outputs = llm.generate(prompts, GREEDY, use_tqdm=False)
        again = llm.generate(prompts[-2:], GREEDY, use_tqdm=False)  # the same prompts again: prefix-cache hits
        assert_all_blocks_released(llm)
        return outputs, again, llm.scheduler.num_preemptions
    finally:
        llm.exit()


# Every mode on two dense and two MoE architectures; TP=2 once per family (spawning ranks is slow on 2 cores).
CASES = [(model, mode) for model in ("qwen3", "llama3", "mixtral", "qwen3_moe") for mode in MODES
         if mode != "tensor-parallel" or model in ("qwen3", "mixtral")]


@pytest.mark.parametrize("model, mode", CASES)
def test_recent_matches_hf_with_the_dropped_entries_hidden(tiny_checkpoint, assert_matches_hf, model, mode):
    path = tiny_checkpoint(model)
    prompts = make_prompts()
    outputs, again, num_preemptions = generate(path, prompts, **MODES[mode])
    if mode == "preemption":
        assert num_preemptions > 0, "the KV pool was meant to be too small: preemption was not exercised"
    assert [o["token_ids"] for o in again] == [o["token_ids"] for o in outputs[-2:]]
    if mode != "preemption":  # (a pool of 8 blocks reuses the prompts' blocks before they are asked for again)
        assert all(o["num_cached_tokens"] > 0 for o in again)
    assert_matches_hf(path, prompts, outputs, dropped=recent_dropped(path, prompts, FIRST, LAST))


def test_the_reference_tells_dropped_entries_apart(tiny_checkpoint):
    """The check can fail: the tokens of `recent` are not those of full attention, nor of another drop set."""
    from nanovllm.testing import hf_greedy_mismatches
    path = tiny_checkpoint("qwen3")
    prompts = make_prompts()[-2:]  # 30 and 45 tokens: most of each prompt is dropped
    outputs, _, _ = generate(path, prompts)
    tokens = [o["token_ids"] for o in outputs]
    assert hf_greedy_mismatches(path, prompts, tokens, dropped=recent_dropped(path, prompts, FIRST, LAST)) == []
    assert hf_greedy_mismatches(path, prompts, tokens)  # full attention disagrees
    assert hf_greedy_mismatches(path, prompts, tokens, dropped=recent_dropped(path, prompts, FIRST + 3, LAST - 3))


def test_nothing_dropped_when_first_plus_last_covers_the_prompt(tiny_checkpoint):
    path = tiny_checkpoint("qwen3")
    prompts = make_prompts()
    keep_all = LLM(path, **OPTIONS)
    expected = keep_all.generate(prompts, GREEDY, use_tqdm=False)
    keep_all.exit()
    recent = LLM(path, **OPTIONS, kv_retention="recent", kv_keep_first=40, kv_keep_last=5)
    assert recent.generate(prompts, GREEDY, use_tqdm=False) == expected
    recent.exit()


def test_a_compacted_sequence_holds_only_the_kept_blocks(tiny_checkpoint):
    """A 100-token prompt keeps 7 entries: from the step that completes it, one block instead of 13."""
    llm = LLM(tiny_checkpoint("qwen3"), **OPTIONS, kv_retention="recent", kv_keep_first=FIRST, kv_keep_last=LAST,
              enable_prefix_caching=False)
    seq, held = blocks_held_per_step(llm, list(range(100, 200)),
                                     SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))
    llm.exit()
    assert seq.num_completion_tokens == 3
    # the prompt is computed in chunks of 64 and 36 tokens; the second step frees 13 blocks and keeps one
    assert held[:2] == [8, 1]
    assert max(held[1:]) <= 2 and held[-1] == 0


@pytest.mark.parametrize("options, message", [
    (dict(kv_keep_last=0), "kv_keep_last=0 must be an integer of at least 1"),
    (dict(kv_keep_first=-1), "kv_keep_first=-1 must be an integer of at least 0"),
    (dict(kv_keep_first=1.5), "kv_keep_first=1.5 must be an integer"),
])
def test_bad_recent_options(tiny_checkpoint, options, message):
    with pytest.raises(ValueError, match=message):
        LLM(tiny_checkpoint("qwen3"), **OPTIONS, kv_retention="recent", **options)


def test_unknown_policy_lists_the_installed_ones(tiny_checkpoint):
    with pytest.raises(ValueError, match=r"kv_retention='snap' is not installed; installed KV-retention policies: "
                                         r"\['keep-all', 'recent'"):
        LLM(tiny_checkpoint("qwen3"), **OPTIONS, kv_retention="snap")
