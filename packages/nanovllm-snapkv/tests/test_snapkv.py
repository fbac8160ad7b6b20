"""SnapKV: the selection against a plain dense reference of the algorithm, and the engine's greedy tokens against
Hugging Face whose attention hides exactly the entries that reference drops, layer by layer."""
import math
import os
import subprocess
import sys

import pytest
import torch

from nanovllm import LLM, SamplingParams
from nanovllm.testing import blocks_held_per_step, hf_greedy_mismatches, make_prompts
from nanovllm_snapkv import select_positions, window_attention

WINDOW, LIMIT, KERNEL = 4, 12, 3
OPTIONS = dict(kvcache_block_size=8, max_model_len=128, max_num_seqs=8, max_num_batched_tokens=64,
               enable_snapkv=True, snapkv_limit=LIMIT, snapkv_attn_sample_queries=WINDOW, snapkv_pool_kernel=KERNEL)
GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


def reference_selection(queries, keys, scale, window, num_kept, kernel) -> list[list[int]]:
    """SnapKV as the paper states it, one KV head at a time, in float64 loops: kept positions per KV head."""
    num_keys, num_kv_heads, _ = keys.shape
    group = queries.size(1) // num_kv_heads
    queries, keys = queries.double(), keys.double()
    kept = []
    for kv_head in range(num_kv_heads):
        scores = [0.0] * num_keys
        for head in range(kv_head * group, (kv_head + 1) * group):
            for w in range(window):
                position = num_keys - window + w  # causal: the query sees keys up to its own position
                logits = [float(queries[w, head] @ keys[j, kv_head]) * scale for j in range(position + 1)]
                top = max(logits)
                total = sum(math.exp(logit - top) for logit in logits)
                for j, logit in enumerate(logits):
                    scores[j] += math.exp(logit - top) / total
        prefix = num_keys - window
        pooled = [max(scores[max(0, j - kernel // 2):min(prefix, j + kernel // 2 + 1)]) for j in range(prefix)]
        order = sorted(range(prefix), key=lambda j: (-pooled[j], j))  # ties: the earlier position
        kept.append(sorted(order[:num_kept - window]) + list(range(prefix, num_keys)))
    return kept


def policy_selection(queries, keys, scale, window, num_kept, kernel, chunk=4096) -> list[list[int]]:
    scores = window_attention(queries, keys, scale, chunk)
    return [sorted(row) for row in select_positions(scores, window, num_kept, kernel).tolist()]


@pytest.mark.parametrize("group", [1, 2, 4])
@pytest.mark.parametrize("num_keys, window, num_kept, kernel, chunk", [
    (40, 4, 12, 3, 4096), (40, 4, 12, 7, 16), (97, 8, 30, 5, 10), (20, 8, 8, 1, 7), (33, 1, 5, 7, 4096)])
def test_selection_equals_the_dense_reference(group, num_keys, window, num_kept, kernel, chunk):
    generator = torch.Generator().manual_seed(num_keys * 10 + group)
    num_kv_heads, dim = 2, 16
    queries = torch.randn(window, num_kv_heads * group, dim, generator=generator) * 2
    keys = torch.randn(num_keys, num_kv_heads, dim, generator=generator) * 2
    scale = dim ** -0.5
    assert (policy_selection(queries, keys, scale, window, num_kept, kernel, chunk)
            == reference_selection(queries, keys, scale, window, num_kept, kernel))


def kernel_matches_torch(window, num_heads, num_kv_heads, dim, num_keys, dtype_name):
    """The Triton kernels (run by Triton's interpreter on the CPU, or compiled on a GPU) against the torch path."""
    from nanovllm_snapkv import kernels
    dtype = getattr(torch, dtype_name)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    generator = torch.Generator().manual_seed(num_keys)
    queries = (torch.randn(window, num_heads, dim, generator=generator) * 2).to(dtype)
    keys = (torch.randn(num_keys, num_kv_heads, dim, generator=generator) * 2).to(dtype)
    expected = window_attention(queries.float(), keys.float(), dim ** -0.5)
    got = kernels.window_attention(queries.to(device), keys.to(device), dim ** -0.5).cpu()
    assert torch.allclose(got, expected, atol=2e-3 if dtype == torch.float32 else 3e-2, rtol=1e-2), \
        (got - expected).abs().max()


@pytest.mark.parametrize("shape", [(4, 4, 2, 16, 40), (8, 8, 2, 24, 130), (3, 2, 2, 32, 64), (16, 16, 4, 16, 17)])
def test_the_triton_kernels_match_torch_under_the_interpreter(shape):
    """Rows and keys that are not a multiple of the tiles, a head size that is not a power of two, GQA 1-4."""
    from nanovllm.testing import run_interpreted
    run_interpreted(__file__, "kernel_matches_torch", *shape, "float32")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("shape", [(128, 16, 8, 128, 32768), (32, 8, 2, 64, 1000), (16, 32, 8, 128, 4097)])
def test_the_triton_kernels_match_torch_on_the_gpu(shape, dtype):
    kernel_matches_torch(*shape, dtype)


def test_window_attention_equals_dense_softmax_sums():
    generator = torch.Generator().manual_seed(3)
    queries, keys = torch.randn(6, 4, 8, generator=generator), torch.randn(50, 2, 8, generator=generator)
    scale = 8 ** -0.5
    q = queries.permute(1, 0, 2)  # [heads, window, dim]
    k = keys.repeat_interleave(2, 1).permute(1, 2, 0)  # [heads, dim, keys]
    logits = (q @ k) * scale
    causal = torch.arange(50) > (torch.arange(6) + 44).unsqueeze(1)
    probs = logits.masked_fill(causal, float("-inf")).softmax(-1)  # [heads, window, keys]
    expected = probs.sum(1).view(2, 2, 50).sum(1)
    for chunk in (4096, 7, 50):
        assert torch.allclose(window_attention(queries, keys, scale, chunk), expected, atol=1e-5)
    assert torch.allclose(expected.sum(-1), torch.full((2,), 12.0))  # 6 queries x 2 heads, each sums to 1


def test_ties_go_to_the_earlier_position_and_the_window_is_always_kept():
    scores = torch.tensor([[0.0, 5.0, 1.0, 1.0, 5.0, 0.0, 9.0, 9.0],
                           [3.0, 3.0, 3.0, 3.0, 3.0, 3.0, 0.0, 0.0]])
    # no pooling: head 0's two 5s tie (both kept at num_kept 4), head 1 keeps its first two 3s
    assert select_positions(scores, 2, 4, 1).tolist() == [[1, 4, 6, 7], [0, 1, 6, 7]]
    # pooling over 3 spreads each 5 to its neighbours: positions 0-5 all score 5, the earliest win
    assert select_positions(scores, 2, 5, 3).tolist() == [[0, 1, 2, 6, 7], [0, 1, 2, 6, 7]]
    # duplicated keys score exactly alike: the earlier copy wins, in the policy as in the reference
    generator = torch.Generator().manual_seed(5)
    keys = torch.randn(30, 1, 8, generator=generator)
    keys[20] = keys[10]
    queries = keys[26:30].repeat(1, 2, 1) * 3  # the window looks for itself and for the duplicate
    assert policy_selection(queries, keys, 0.5, 4, 6, 1) == reference_selection(queries, keys, 0.5, 4, 6, 1)


def snapkv_dropped(prompts, window=WINDOW, limit=LIMIT, kernel=KERNEL):
    """For hf_greedy_mismatches: per prompt, a function that runs the dense reference on Hugging Face's own
    queries and keys of each layer and returns what it drops (None for prompts within the limit)."""
    def dropped_for(prompt_len):
        def dropped(layer, query, key, scale):
            queries = query[0, :, prompt_len - window:prompt_len].transpose(0, 1)
            keys = key[0, :, :prompt_len].transpose(0, 1)
            mask = torch.ones(keys.size(1), prompt_len, dtype=torch.bool)
            for kv_head, positions in enumerate(reference_selection(queries, keys, scale, window, limit, kernel)):
                mask[kv_head, positions] = False
            return mask
        return dropped
    return [dropped_for(len(p)) if len(p) > limit else None for p in prompts]


def assert_all_blocks_released(llm):
    manager = llm.scheduler.block_manager
    assert [b.block_id for b in manager.blocks if b.ref_count] == []
    assert manager.num_free_blocks == len(manager.blocks)


MODES = {
    "plain": dict(),
    "chunked-prefill": dict(max_num_batched_tokens=16),  # 30 and 45 tokens: the window spans chunk borders
    "preemption": dict(num_kvcache_blocks=8, max_model_len=64, max_num_seqs=4, max_num_batched_tokens=32),
    "tensor-parallel": dict(tensor_parallel_size=2),
}
CASES = [(model, mode) for model in ("qwen3", "llama3", "mixtral", "qwen3_moe") for mode in MODES
         if mode != "tensor-parallel" or model in ("qwen3", "mixtral")]


@pytest.mark.parametrize("model, mode", CASES)
def test_greedy_tokens_match_hf_with_the_reference_drops_hidden(tiny_checkpoint, model, mode):
    path = tiny_checkpoint(model)
    prompts = make_prompts()
    llm = LLM(path, **{**OPTIONS, **MODES[mode]})
    try:
        outputs = llm.generate(prompts, GREEDY, use_tqdm=False)
        again = llm.generate(prompts[-2:], GREEDY, use_tqdm=False)  # the same prompts: prefix-cache hits
        num_preemptions = llm.scheduler.num_preemptions
        assert_all_blocks_released(llm)
    finally:
        llm.exit()
    if mode == "preemption":
        assert num_preemptions > 0, "the KV pool was meant to be too small: preemption was not exercised"
    else:  # (a pool of 8 blocks reuses the prompts' blocks before they are asked for again)
        assert all(o["num_cached_tokens"] > 0 for o in again)
    assert [o["token_ids"] for o in again] == [o["token_ids"] for o in outputs[-2:]]
    tokens = [o["token_ids"] for o in outputs]
    problems = hf_greedy_mismatches(path, prompts, tokens, dropped=snapkv_dropped(prompts))
    assert not problems, "\n".join(problems)


def test_the_reference_check_can_fail(tiny_checkpoint):
    """SnapKV's tokens are not those of full attention, nor of SnapKV with another pooling."""
    path = tiny_checkpoint("qwen3")
    prompts = make_prompts()[-2:]
    llm = LLM(path, **OPTIONS)
    tokens = [o["token_ids"] for o in llm.generate(prompts, GREEDY, use_tqdm=False)]
    llm.exit()
    assert hf_greedy_mismatches(path, prompts, tokens, dropped=snapkv_dropped(prompts)) == []
    assert hf_greedy_mismatches(path, prompts, tokens)
    assert hf_greedy_mismatches(path, prompts, tokens, dropped=snapkv_dropped(prompts, kernel=1))


def test_limit_at_least_the_prompt_gives_the_tokens_of_snapkv_off(tiny_checkpoint):
    path = tiny_checkpoint("qwen3")
    prompts = make_prompts()
    results = {}
    for enable in (False, True):
        llm = LLM(path, **{**OPTIONS, "enable_snapkv": enable, "snapkv_limit": 45})
        results[enable] = llm.generate(prompts, GREEDY, use_tqdm=False)
        llm.exit()
    assert results[True] == results[False]


def test_a_long_prompt_holds_only_the_limits_blocks_while_it_decodes(tiny_checkpoint):
    llm = LLM(tiny_checkpoint("qwen3"), **{**OPTIONS, "enable_prefix_caching": False})
    assert type(llm.model_runner.retention).name == "snapkv"
    seq, held = blocks_held_per_step(llm, list(range(100, 200)),
                                     SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
    llm.exit()
    assert seq.num_completion_tokens == 4
    assert held[:2] == [8, 2]  # 64 + 36 prompt tokens; then ceil(12 / 8) blocks instead of 13
    assert max(held[1:]) <= 3 and held[-1] == 0


@pytest.mark.parametrize("options, message", [
    (dict(snapkv_limit=3), r"snapkv_limit=3 is below snapkv_attn_sample_queries=4"),
    (dict(snapkv_attn_sample_queries=0), r"snapkv_attn_sample_queries=0 must be a positive integer"),
    (dict(snapkv_pool_kernel=0), r"snapkv_pool_kernel=0 must be a positive integer"),
    (dict(snapkv_pool_kernel=4), r"snapkv_pool_kernel=4 must be odd"),
    (dict(snapkv_limit=2.5), r"snapkv_limit=2.5 must be a positive integer"),
    (dict(snapkv_attn_sample_queries=60, snapkv_limit=100), r"reads the last 60 queries of a prompt in one step"),
])
def test_bad_options_fail_at_once(tiny_checkpoint, options, message):
    with pytest.raises(ValueError, match=message):
        LLM(tiny_checkpoint("qwen3"), **{**OPTIONS, **options})


def test_snapkv_options_without_the_package_are_unknown(tiny_checkpoint):
    code = ("from nanovllm import LLM\nimport sys\n"
            "try:\n    LLM(sys.argv[1], enable_snapkv=True)\nexcept TypeError as exc:\n    print(exc)\n")
    env = {**os.environ, "NANOVLLM_PLUGINS": "models,attn_mps", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", code, tiny_checkpoint("qwen3")], capture_output=True, text=True,
                            env=env, timeout=120)
    assert "unknown option(s) 'enable_snapkv'" in result.stdout, result.stdout + result.stderr[-2000:]


def test_snapkv_by_name_and_enable_snapkv_pick_the_policy(tiny_checkpoint):
    path = tiny_checkpoint("qwen3")
    for options in (dict(enable_snapkv=True), dict(enable_snapkv=False, kv_retention="snapkv")):
        llm = LLM(path, **{**OPTIONS, **options})
        assert type(llm.scheduler.retention).name == "snapkv"
        llm.exit()
    llm = LLM(path, **{**OPTIONS, "enable_snapkv": False})
    assert type(llm.scheduler.retention).name == "keep-all"
    llm.exit()


@pytest.mark.gpu
@pytest.mark.parametrize("model", ["qwen3", "llama3", "mixtral"])
def test_on_flash_attn_the_selection_is_the_references_and_tokens_match_hf(model, tiny_checkpoint):
    """On fa2 (fa1 where flash-attn 1 is the one installed), decode CUDA graphs on: each selection made on CUDA
    equals the dense reference on the same queries and keys, and greedy tokens equal Hugging Face's with exactly
    the selected entries hidden (bf16 near-ties allowed, MoE routing near-ties too)."""
    import random

    from nanovllm.platform import flash_attn_version
    from nanovllm.testing import GPU_MOE, GPU_TINY
    window, limit, kernel = 32, 300, 7
    backend, dtype = ("fa1", torch.float16) if (flash_attn_version() or "").startswith("1.") else ("fa2", torch.bfloat16)
    path = tiny_checkpoint(model, **{**GPU_TINY, "dtype": dtype, **GPU_MOE.get(model, {})})
    llm = LLM(path, attention_backend=backend, max_model_len=2048, enable_snapkv=True, snapkv_limit=limit,
              snapkv_attn_sample_queries=window, snapkv_pool_kernel=kernel, max_num_batched_tokens=512,
              max_num_seqs=8, kv_cache_memory_gib=1)
    policy, calls = llm.model_runner.retention, []
    select = policy.select

    def recorded_select(layer, queries, keys, num_kept, scale):
        calls.append((layer, queries, keys, num_kept, scale, select(layer, queries, keys, num_kept, scale)))
        return calls[-1][-1]
    policy.select = recorded_select
    rng = random.Random(0)
    prompts = [[rng.randrange(512) for _ in range(n)] for n in (100, 700, 1300)]  # the longer two are compacted
    dropped, tokens = [], []
    for prompt in prompts:  # one at a time, to know which selections belong to which prompt
        calls.clear()
        params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
        tokens.append(llm.generate([prompt], params, use_tqdm=False)[0]["token_ids"])
        mask = torch.ones(len(calls), llm.config.hf_config.num_key_value_heads, len(prompt), dtype=torch.bool)
        for layer, queries, keys, num_kept, scale, positions in calls:
            assert [sorted(row) for row in positions.tolist()] == reference_selection(
                queries.cpu(), keys.cpu(), scale, window, num_kept, kernel)
            mask[layer].scatter_(1, positions.cpu(), False)
        dropped.append(mask if calls else None)
    llm.exit()
    assert dropped[0] is None and dropped[1] is not None and dropped[2] is not None
    near_ties = dict(noise_dtype=torch.float32, router_tol=0.04) if model in GPU_MOE else {}
    problems = hf_greedy_mismatches(path, prompts, tokens, tol=0.1, device="cuda", dtype=dtype, dropped=dropped,
                                    **near_ties)
    assert not problems, "\n".join(problems)


RETRIEVAL_MODEL = os.path.join(os.path.dirname(__file__), "fixtures", "retrieval")


def test_at_4x_compression_snapkv_keeps_what_the_trained_model_needs():
    """The committed model (tools/train_retrieval_model.py: 4 layers, 0.9M parameters, 280 s on an H100) recalls
    4-digit values of needles in 512-token prompts. With a quarter of the KV, SnapKV keeps at least 95% of full-KV
    accuracy; `recent`, at the same budget, keeps a needle only when it happens to be near the end."""
    from nanovllm.testing import RetrievalTask, retrieval_accuracy
    length, budget = 512, 128
    options = dict(max_model_len=length + 4, kvcache_block_size=16, max_num_seqs=64, max_num_batched_tokens=4096)
    accuracy = {}
    for name, extra in [("full", {}),
                        ("snapkv", dict(enable_snapkv=True, snapkv_limit=budget, snapkv_attn_sample_queries=16)),
                        ("recent", dict(kv_retention="recent", kv_keep_first=4, kv_keep_last=budget - 4))]:
        llm = LLM(RETRIEVAL_MODEL, **options, **extra)
        accuracy[name] = retrieval_accuracy(llm, RetrievalTask(), length, num_prompts=100, seed=1)
        llm.exit()
    assert accuracy["full"] >= 0.95, accuracy  # the model does the task
    assert accuracy["snapkv"] >= 0.95 * accuracy["full"], accuracy
    assert accuracy["recent"] <= accuracy["snapkv"] - 0.3, accuracy
