"""fa2 on a GPU: attention against torch SDPA, and greedy tokens against Hugging Face in bf16."""
import random

import pytest
import torch
import torch.nn.functional as F

from nanovllm.testing import GPU_MODES, GPU_TINY, check_gpu_greedy_matches_hf
from nanovllm.engine.context import Context

pytestmark = pytest.mark.gpu
BLOCK = 256
GPU_TINY = {**GPU_TINY, "dtype": torch.bfloat16}


def reference(q_all, k_all, v_all, scale):
    """Causal attention of the last q_all.size(0) positions over all keys, GQA by repetition."""
    group = q_all.size(1) // k_all.size(1)
    q = q_all.transpose(0, 1).unsqueeze(0).float()
    k = k_all.repeat_interleave(group, 1).transpose(0, 1).unsqueeze(0).float()
    v = v_all.repeat_interleave(group, 1).transpose(0, 1).unsqueeze(0).float()
    offset = k_all.size(0) - q_all.size(0)
    mask = torch.arange(k_all.size(0), device=q.device)[None, :] <= (torch.arange(q_all.size(0), device=q.device)[:, None] + offset)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)[0].transpose(0, 1)


def run_case(seqs, head_dim, num_heads=8, num_kv_heads=2, dtype=torch.bfloat16):
    """seqs: (cached tokens, new tokens) per sequence. Returns max error against the reference."""
    from nanovllm_attn_fa2 import FlashAttention2
    device, scale = "cuda", head_dim ** -0.5
    backend = FlashAttention2(num_heads, head_dim, num_kv_heads, scale, None)
    max_blocks = max(-(-(c + n) // BLOCK) for c, n in seqs)
    num_blocks = len(seqs) * max_blocks + 3
    kv_cache = torch.randn(2, num_blocks, BLOCK, num_kv_heads, head_dim, device=device, dtype=dtype)
    ids = torch.randperm(num_blocks, device=device)
    tables = ids[:len(seqs) * max_blocks].view(len(seqs), max_blocks).int()
    full = [(torch.randn(c + n, num_heads, head_dim, device=device, dtype=dtype),
             torch.randn(c + n, num_kv_heads, head_dim, device=device, dtype=dtype),
             torch.randn(c + n, num_kv_heads, head_dim, device=device, dtype=dtype)) for c, n in seqs]
    slots = []
    for i, ((c, n), (_, k, v)) in enumerate(zip(seqs, full)):
        pos = torch.arange(c + n, device=device)
        slot = tables[i, pos // BLOCK].long() * BLOCK + pos % BLOCK
        kv_cache[0].view(-1, num_kv_heads, head_dim)[slot[:c]] = k[:c]  # the cached prefix
        kv_cache[1].view(-1, num_kv_heads, head_dim)[slot[:c]] = v[:c]
        slots.append(slot[c:])
    cu_q = torch.tensor([0] + [n for _, n in seqs], device=device).cumsum(0).int()
    cu_k = torch.tensor([0] + [c + n for c, n in seqs], device=device).cumsum(0).int()
    context = Context(cu_q, cu_k, max(n for _, n in seqs), max(c + n for c, n in seqs), torch.cat(slots),
                      cu_k.diff(), tables, all(n == 1 for _, n in seqs))
    q = torch.cat([q[c:] for (c, _), (q, _, _) in zip(seqs, full)])
    k = torch.cat([k[c:] for (c, _), (_, k, _) in zip(seqs, full)])
    v = torch.cat([v[c:] for (c, _), (_, _, v) in zip(seqs, full)])
    out = backend.forward(q, k, v, kv_cache, context)
    expected = torch.cat([reference(q_[c:], k_, v_, scale) for (c, _), (q_, k_, v_) in zip(seqs, full)])
    return (out.float() - expected).abs().max().item()


@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("case, seqs", [
    ("prefill", [(0, 1), (0, 100), (0, 256), (0, 700)]),
    ("prefix-cached prefill", [(256, 10), (512, 300), (256, 1)]),
    ("decode", [(0, 1), (37, 1), (511, 1), (1300, 1)]),
    ("mixed", [(300, 1), (0, 77), (256, 40), (900, 1)]),
])
def test_fa2_matches_sdpa(case, seqs, head_dim):
    assert run_case(seqs, head_dim) < 2e-2


def test_engine_checks_block_size_up_front(tiny_checkpoint):
    from nanovllm import LLM
    with pytest.raises(ValueError, match="multiple of 256"):
        LLM(tiny_checkpoint("qwen3", **GPU_TINY), attention_backend="fa2", kvcache_block_size=16)


@pytest.mark.parametrize("mode", GPU_MODES)
@pytest.mark.parametrize("model", ["qwen3", "qwen2", "llama3"])
def test_greedy_matches_hf_bf16(model, mode, tiny_checkpoint):
    check_gpu_greedy_matches_hf(tiny_checkpoint(model, **GPU_TINY), mode, "fa2", torch.bfloat16)


@pytest.mark.multi_gpu
def test_tensor_parallel_2_same_first_tokens(tiny_checkpoint):
    """TP=2 over NCCL: the first token of every prompt equals TP=1's, and every token is HF's argmax
    (up to bf16 near-ties: a different reduction order may flip a near-tie later on)."""
    from nanovllm.testing import hf_greedy_mismatches
    from nanovllm import LLM, SamplingParams
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs (nvidia-h200-x2)")
    path = tiny_checkpoint("qwen3", **GPU_TINY)
    rng = random.Random(3)
    prompts = [[rng.randrange(512) for _ in range(n)] for n in (5, 300, 900)]
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    tokens = {}
    for tp in (1, 2):
        llm = LLM(path, tensor_parallel_size=tp, max_model_len=2048)
        tokens[tp] = [o["token_ids"] for o in llm.generate(prompts, params, use_tqdm=False)]
        llm.exit()
    assert [t[0] for t in tokens[2]] == [t[0] for t in tokens[1]]
    problems = hf_greedy_mismatches(path, prompts, tokens[2], tol=0.1, device="cuda", dtype=torch.bfloat16)
    assert not problems, "\n".join(problems)


def test_too_little_memory_is_a_clear_error(tiny_checkpoint):
    from nanovllm import LLM
    with pytest.raises(ValueError, match="fewer than max_model_len=2048.*gpu_memory_utilization"):
        LLM(tiny_checkpoint("qwen3", **GPU_TINY), max_model_len=2048, gpu_memory_utilization=0.001)


def test_logprobs_and_prompt_logprobs_match_hf(tiny_checkpoint):
    """On the GPU (pinned copies back, chunked prefill of a 700-token prompt, decode graphs): each sampled and each
    prompt token's log-probability against Hugging Face's log_softmax in bf16."""
    from transformers import AutoModelForCausalLM
    from nanovllm import LLM, SamplingParams
    path = tiny_checkpoint("qwen3", **GPU_TINY)
    rng = random.Random(5)
    prompts = [[rng.randrange(512) for _ in range(n)] for n in (700, 40)]
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, logprobs=2, prompt_logprobs=2)
    with LLM(path, max_model_len=2048, max_num_batched_tokens=256, max_num_seqs=8) as llm:
        outputs = llm.generate(prompts, params, use_tqdm=False)
    hf = AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.bfloat16).cuda()
    for prompt, out in zip(prompts, outputs):
        tokens = prompt + out["token_ids"]
        with torch.no_grad():
            reference = torch.log_softmax(hf(torch.tensor([tokens], device="cuda")).logits[0, :-1].float(), dim=-1)
        got = [entry[token] for entry, token in zip(out["prompt_logprobs"][1:], prompt[1:])]
        got += [entry[token] for entry, token in zip(out["logprobs"], out["token_ids"])]
        assert out["prompt_logprobs"][0] is None and len(got) == len(tokens) - 1
        expected = reference.gather(1, torch.tensor(tokens[1:], device="cuda")[:, None])[:, 0]
        assert (torch.tensor(got, device="cuda") - expected).abs().max().item() < 0.1


def test_tokens_unchanged_when_the_gpu_lags_steps_behind(tiny_checkpoint):
    """Chunks of one long prompt sample nothing, so nothing waits for them: with the GPU held back before every
    step the CPU runs steps ahead, and each step's inputs must still reach the GPU intact (its pinned staging
    buffers are refilled only after their copies ran). Same tokens as the same engine with the GPU not held back."""
    from nanovllm import LLM, SamplingParams
    path = tiny_checkpoint("qwen3", **GPU_TINY)
    rng = random.Random(9)
    prompts = [[rng.randrange(512) for _ in range(1800)]]
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    options = dict(max_model_len=2048, max_num_batched_tokens=64, max_num_seqs=4, enable_prefix_caching=False)
    with LLM(path, **options) as llm:
        expected = llm.generate(prompts, params, use_tqdm=False)[0]["token_ids"]
        runner, run_model = llm.model_runner, llm.model_runner.run_model

        def held_back(inputs):
            torch.cuda._sleep(5_000_000)  # a few milliseconds of GPU time queued ahead of the step
            return run_model(inputs)
        runner.run_model = held_back
        assert llm.generate(prompts, params, use_tqdm=False)[0]["token_ids"] == expected
