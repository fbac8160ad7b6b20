"""TorchPagedAttention against a plain per-sequence causal SDPA reference, on CPU.

Every forward test builds the step exactly as the model runner does (see nanovllm.engine.context.Context):
a paged KV cache [2, num_blocks, block_size, num_kv_heads, head_dim], block tables of shuffled,
non-contiguous block ids padded with 0, the slot of each new token, cu_seqlens_q/k, context_lens,
max_seqlen_q/k and is_decode. The reference runs full causal attention over each sequence's whole
K/V and keeps only the query rows computed in the step.
"""
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

from nanovllm.attention_backend import select_backend
from nanovllm.engine.context import Context
from nanovllm.platform import Platform
from nanovllm_attn_mps import TorchPagedAttention, register_attention_backends, store_kv

NUM_HEADS, NUM_KV_HEADS, HEAD_DIM = 4, 2, 16
SCALE = 0.3  # not head_dim ** -0.5 (0.25), so a backend that drops the scale is caught
F32_TOL = dict(atol=1e-5, rtol=1e-5)
BF16_TOL = dict(atol=2e-2, rtol=2e-2)


# ---- helpers -------------------------------------------------------------------------------


@dataclass
class Seq:
    q: torch.Tensor  # [L, NUM_HEADS, HEAD_DIM], the whole sequence
    k: torch.Tensor  # [L, NUM_KV_HEADS, HEAD_DIM]
    v: torch.Tensor
    blocks: list[int]  # block table for the whole sequence

    def __len__(self):
        return self.q.size(0)


class Pool:
    """Hands out block ids in a shuffled order, so that no sequence gets consecutive ascending blocks."""

    def __init__(self, num_blocks: int, seed: int = 0):
        gen = torch.Generator().manual_seed(seed)
        self.free = torch.randperm(num_blocks, generator=gen).tolist()

    def take(self, n: int) -> list[int]:
        assert n <= len(self.free), "test setup: cache too small"
        blocks, self.free = self.free[:n], self.free[n:]
        if n > 1 and blocks == list(range(blocks[0], blocks[0] + n)):
            blocks.reverse()
        return blocks


def new_seqs(lens, pool: Pool, block_size: int, dtype=torch.float32, seed: int = 0) -> list[Seq]:
    gen = torch.Generator().manual_seed(seed)
    seqs = []
    for n in lens:
        q = torch.randn(n, NUM_HEADS, HEAD_DIM, generator=gen).to(dtype)
        k = torch.randn(n, NUM_KV_HEADS, HEAD_DIM, generator=gen).to(dtype)
        v = torch.randn(n, NUM_KV_HEADS, HEAD_DIM, generator=gen).to(dtype)
        seqs.append(Seq(q, k, v, pool.take(-(-n // block_size))))
    return seqs


def new_cache(num_blocks: int, block_size: int, dtype=torch.float32, garbage: bool = True) -> torch.Tensor:
    """Blocks hold large leftovers from earlier sequences (or zeros): attention must mask them away."""
    shape = (2, num_blocks, block_size, NUM_KV_HEADS, HEAD_DIM)
    if not garbage:
        return torch.zeros(shape, dtype=dtype)
    gen = torch.Generator().manual_seed(1234)
    return (torch.randn(shape, generator=gen) * 50).to(dtype)


def slot(seq: Seq, pos: int, block_size: int) -> int:
    return seq.blocks[pos // block_size] * block_size + pos % block_size


def write_prefix(cache: torch.Tensor, seq: Seq, end: int, block_size: int):
    """Put tokens [0, end) of seq into the cache directly (not through store_kv)."""
    for pos in range(end):
        block, offset = seq.blocks[pos // block_size], pos % block_size
        cache[0, block, offset] = seq.k[pos]
        cache[1, block, offset] = seq.v[pos]


def read_back(cache: torch.Tensor, seq: Seq, end: int, block_size: int):
    """K and V of tokens [0, end) of seq as stored in the cache."""
    ks = torch.stack([cache[0, seq.blocks[p // block_size], p % block_size] for p in range(end)])
    vs = torch.stack([cache[1, seq.blocks[p // block_size], p % block_size] for p in range(end)])
    return ks, vs


def make_step(runs, block_size: int):
    """runs: (seq, start, count) per sequence: compute tokens [start, start + count) of seq.

    Returns the step's q, k, v in varlen layout and its Context, built as the model runner builds it.
    """
    counts = [count for _, _, count in runs]
    ends = [start + count for _, start, count in runs]
    cu_q = torch.zeros(len(runs) + 1, dtype=torch.int32)
    cu_q[1:] = torch.tensor(counts).cumsum(0)
    cu_k = torch.zeros(len(runs) + 1, dtype=torch.int32)
    cu_k[1:] = torch.tensor(ends).cumsum(0)
    tables = [seq.blocks[:-(-end // block_size)] for (seq, _, _), end in zip(runs, ends)]
    block_tables = torch.zeros(len(runs), max(map(len, tables)), dtype=torch.int32)  # padded with 0
    for i, table in enumerate(tables):
        block_tables[i, :len(table)] = torch.tensor(table, dtype=torch.int32)
    slots = [slot(seq, pos, block_size) for seq, start, count in runs for pos in range(start, start + count)]
    q = torch.cat([seq.q[start:start + count] for seq, start, count in runs])
    k = torch.cat([seq.k[start:start + count] for seq, start, count in runs])
    v = torch.cat([seq.v[start:start + count] for seq, start, count in runs])
    context = Context(
        cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=max(counts), max_seqlen_k=max(ends),
        slot_mapping=torch.tensor(slots, dtype=torch.int64), context_lens=torch.tensor(ends, dtype=torch.int32),
        block_tables=block_tables, is_decode=all(count == 1 for count in counts))
    return q, k, v, context


def reference(seq: Seq, start: int, count: int) -> torch.Tensor:
    """Causal attention over the whole of seq (tokens [0, start + count)), rows [start, start + count), fp32."""
    end = start + count
    kv_head = torch.arange(NUM_HEADS) // (NUM_HEADS // NUM_KV_HEADS)  # q head h reads kv head h // group
    q = seq.q[:end].float().transpose(0, 1)
    k = seq.k[:end, kv_head].float().transpose(0, 1)
    v = seq.v[:end, kv_head].float().transpose(0, 1)
    out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=SCALE).transpose(0, 1)
    return out[start:end]


def backend() -> TorchPagedAttention:
    return TorchPagedAttention(NUM_HEADS, HEAD_DIM, NUM_KV_HEADS, SCALE, None)


def run_and_check(runs, cache, block_size, tol=F32_TOL):
    """One forward over the runs; checks output rows and that the step's K/V landed in the cache."""
    q, k, v, context = make_step(runs, block_size)
    out = backend().forward(q, k, v, cache, context)
    assert out.shape == (q.size(0), NUM_HEADS, HEAD_DIM)
    assert out.dtype == q.dtype
    expected = torch.cat([reference(seq, start, count) for seq, start, count in runs])
    torch.testing.assert_close(out.float(), expected, **tol)
    for seq, start, count in runs:
        ks, vs = read_back(cache, seq, start + count, block_size)
        torch.testing.assert_close(ks, seq.k[:start + count], atol=0, rtol=0)
        torch.testing.assert_close(vs, seq.v[:start + count], atol=0, rtol=0)
    return out


# ---- forward --------------------------------------------------------------------------------


@pytest.mark.parametrize("block_size", [4, 8])
def test_prefill_from_empty_cache(block_size):
    # 1 token, exactly one block, several blocks (one partial), and a partial first block
    lens = [1, block_size, 3 * block_size + 1, block_size - 1, 2 * block_size]
    pool = Pool(32)
    seqs = new_seqs(lens, pool, block_size)
    assert any(seq.blocks != sorted(seq.blocks) for seq in seqs), "test setup: block ids should be shuffled"
    cache = new_cache(32, block_size, garbage=False)
    run_and_check([(seq, 0, len(seq)) for seq in seqs], cache, block_size)


@pytest.mark.parametrize("block_size", [4, 8])
def test_prefill_leaves_other_blocks_alone(block_size):
    pool = Pool(16)
    seqs = new_seqs([5, 2 * block_size], pool, block_size)
    cache = new_cache(16, block_size)
    before = cache.clone()
    run_and_check([(seq, 0, len(seq)) for seq in seqs], cache, block_size)
    written = torch.zeros(16, block_size, dtype=torch.bool)
    for seq in seqs:
        for pos in range(len(seq)):
            written[seq.blocks[pos // block_size], pos % block_size] = True
    assert torch.equal(cache[:, ~written], before[:, ~written])


@pytest.mark.parametrize("block_size", [4, 8])
def test_prefix_cached_prefill(block_size):
    # (total length, tokens already cached): whole cached blocks as the prefix cache gives, and odd splits
    shapes = [(3 * block_size + 2, 2 * block_size), (2 * block_size, block_size), (4 * block_size + 3, 4 * block_size),
              (block_size + 1, 1), (2 * block_size + 1, 2 * block_size - 1)]
    pool = Pool(64)
    seqs = new_seqs([n for n, _ in shapes], pool, block_size, seed=1)
    cache = new_cache(64, block_size)
    for seq, (_, cached) in zip(seqs, shapes):
        write_prefix(cache, seq, cached, block_size)
    run_and_check([(seq, cached, len(seq) - cached) for seq, (_, cached) in zip(seqs, shapes)], cache, block_size)


@pytest.mark.parametrize("block_size", [4, 8])
def test_chunked_prefill(block_size):
    chunks = [8, 5, 16, 1, 7]  # not aligned to the block size
    pool = Pool(32)
    (seq,) = new_seqs([sum(chunks)], pool, block_size, seed=2)
    cache = new_cache(32, block_size)
    outs, start = [], 0
    for count in chunks:
        q, k, v, context = make_step([(seq, start, count)], block_size)
        outs.append(backend().forward(q, k, v, cache, context))
        start += count
    torch.testing.assert_close(torch.cat(outs), reference(seq, 0, len(seq)), **F32_TOL)


@pytest.mark.parametrize("block_size", [4, 8])
def test_chunked_prefill_alongside_another_sequence(block_size):
    # Two long prompts, each in chunks of different sizes, sharing every step.
    pool = Pool(64)
    a, b = new_seqs([29, 41], pool, block_size, seed=3)
    cache = new_cache(64, block_size)
    plan = [(7, 16), (16, 3), (6, 22)]  # chunk of a, chunk of b, per step
    outs_a, outs_b, start_a, start_b = [], [], 0, 0
    for count_a, count_b in plan:
        q, k, v, context = make_step([(a, start_a, count_a), (b, start_b, count_b)], block_size)
        out = backend().forward(q, k, v, cache, context)
        outs_a.append(out[:count_a])
        outs_b.append(out[count_a:])
        start_a += count_a
        start_b += count_b
    torch.testing.assert_close(torch.cat(outs_a), reference(a, 0, len(a)), **F32_TOL)
    torch.testing.assert_close(torch.cat(outs_b), reference(b, 0, len(b)), **F32_TOL)


@pytest.mark.parametrize("block_size", [4, 8])
def test_decode(block_size):
    lens = [2, 17, 64, block_size, block_size + 1, 33]  # context after this step, including the new token
    pool = Pool(64)
    seqs = new_seqs(lens, pool, block_size, seed=4)
    cache = new_cache(64, block_size)
    for seq in seqs:
        write_prefix(cache, seq, len(seq) - 1, block_size)
    runs = [(seq, len(seq) - 1, 1) for seq in seqs]
    assert make_step(runs, block_size)[3].is_decode
    run_and_check(runs, cache, block_size)


@pytest.mark.parametrize("block_size", [4, 8])
def test_decode_steps_in_a_row(block_size):
    # Prefill, then several decode steps that each append a token: the output of every step matches.
    pool = Pool(32)
    seqs = new_seqs([14, 23], pool, block_size, seed=5)
    cache = new_cache(32, block_size)
    prompt = [9, 18]
    run_and_check([(seq, 0, n) for seq, n in zip(seqs, prompt)], cache, block_size)
    for step in range(5):
        run_and_check([(seq, n + step, 1) for seq, n in zip(seqs, prompt)], cache, block_size)


def mixed_runs(block_size, dtype=torch.float32):
    """Decodes, prefix-cached chunks and a fresh prefill in one batch, in no particular order."""
    pool = Pool(96)
    lens = [40, 13, 1, 26, 3 * block_size, 9, 50]
    seqs = new_seqs(lens, pool, block_size, dtype=dtype, seed=6)
    cache = new_cache(96, block_size, dtype=dtype)
    starts = [39, 5, 0, 25, block_size, 0, 17]  # decode, chunk, 1-token prefill, decode, chunk, prefill, chunk
    counts = [1, 8, 1, 1, 2 * block_size, 9, 11]
    for seq, start in zip(seqs, starts):
        write_prefix(cache, seq, start, block_size)
    return [(seq, start, count) for seq, start, count in zip(seqs, starts, counts)], cache


@pytest.mark.parametrize("block_size", [4, 8])
def test_mixed_batch(block_size):
    runs, cache = mixed_runs(block_size)
    assert not make_step(runs, block_size)[3].is_decode
    run_and_check(runs, cache, block_size)


def test_mixed_batch_bfloat16():
    runs, cache = mixed_runs(8, dtype=torch.bfloat16)
    out = run_and_check(runs, cache, 8, tol=BF16_TOL)
    assert out.dtype == torch.bfloat16


def test_inputs_that_are_views_of_a_fused_qkv():
    # The models split a fused qkv projection: q, k and v reach the backend as non-contiguous views.
    block_size = 4
    pool = Pool(32)
    seqs = new_seqs([11, 6], pool, block_size, seed=7)
    cache = new_cache(32, block_size)
    write_prefix(cache, seqs[0], 4, block_size)
    runs = [(seqs[0], 4, 7), (seqs[1], 0, 6)]
    q, k, v, context = make_step(runs, block_size)
    fused = torch.cat([q.flatten(1), k.flatten(1), v.flatten(1)], dim=-1)
    q_size, kv_size = NUM_HEADS * HEAD_DIM, NUM_KV_HEADS * HEAD_DIM
    qv, kv_, vv = fused.split([q_size, kv_size, kv_size], dim=-1)
    qv = qv.view(-1, NUM_HEADS, HEAD_DIM)
    kv_ = kv_.view(-1, NUM_KV_HEADS, HEAD_DIM)
    vv = vv.view(-1, NUM_KV_HEADS, HEAD_DIM)
    assert not kv_.is_contiguous() and not vv.is_contiguous()
    out = backend().forward(qv, kv_, vv, cache, context)
    expected = torch.cat([reference(seq, start, count) for seq, start, count in runs])
    torch.testing.assert_close(out, expected, **F32_TOL)
    for seq, start, count in runs:
        ks, vs = read_back(cache, seq, start + count, block_size)
        torch.testing.assert_close(ks, seq.k[:start + count], atol=0, rtol=0)
        torch.testing.assert_close(vs, seq.v[:start + count], atol=0, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_warmup_with_empty_cache(dtype):
    # The model runner's warm-up: no cache, slots -1, block tables [num_seqs, 0], plain prefills.
    lens = [5, 1, 12, 7]
    gen = torch.Generator().manual_seed(8)
    seqs = [Seq(torch.randn(n, NUM_HEADS, HEAD_DIM, generator=gen).to(dtype),
                torch.randn(n, NUM_KV_HEADS, HEAD_DIM, generator=gen).to(dtype),
                torch.randn(n, NUM_KV_HEADS, HEAD_DIM, generator=gen).to(dtype), []) for n in lens]
    cu = torch.zeros(len(lens) + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(lens).cumsum(0)
    context = Context(cu_seqlens_q=cu, cu_seqlens_k=cu.clone(), max_seqlen_q=max(lens), max_seqlen_k=max(lens),
                      slot_mapping=torch.full((sum(lens),), -1, dtype=torch.int64),
                      context_lens=torch.tensor(lens, dtype=torch.int32),
                      block_tables=torch.zeros(len(lens), 0, dtype=torch.int32), is_decode=False)
    q, k, v = (torch.cat([getattr(seq, name) for seq in seqs]) for name in "qkv")
    out = backend().forward(q, k, v, torch.tensor([]), context)
    assert out.shape == (sum(lens), NUM_HEADS, HEAD_DIM)
    expected = torch.cat([reference(seq, 0, len(seq)) for seq in seqs])
    torch.testing.assert_close(out.float(), expected, **(F32_TOL if dtype == torch.float32 else BF16_TOL))


# ---- store_kv -------------------------------------------------------------------------------


@pytest.mark.parametrize("block_size", [4, 8])
def test_store_kv_writes_exactly_the_slots(block_size):
    num_blocks = 6
    cache = new_cache(num_blocks, block_size)
    before = cache.clone()
    last_slot = num_blocks * block_size - 1
    slots = [3 * block_size + 1, 0, last_slot - 1, block_size + 2, 5 * block_size - 1]
    gen = torch.Generator().manual_seed(9)
    k = torch.randn(len(slots), NUM_KV_HEADS, HEAD_DIM, generator=gen)
    v = torch.randn(len(slots), NUM_KV_HEADS, HEAD_DIM, generator=gen)
    store_kv(k, v, cache, torch.tensor(slots, dtype=torch.int64))
    flat_k = cache[0].reshape(-1, NUM_KV_HEADS, HEAD_DIM)
    flat_v = cache[1].reshape(-1, NUM_KV_HEADS, HEAD_DIM)
    for i, s in enumerate(slots):
        assert torch.equal(flat_k[s], k[i]) and torch.equal(flat_v[s], v[i])
        assert torch.equal(cache[0, s // block_size, s % block_size], k[i])
    untouched = torch.ones(num_blocks * block_size, dtype=torch.bool)
    untouched[slots] = False
    assert torch.equal(flat_k[untouched], before[0].reshape(-1, NUM_KV_HEADS, HEAD_DIM)[untouched])
    assert torch.equal(flat_v[untouched], before[1].reshape(-1, NUM_KV_HEADS, HEAD_DIM)[untouched])


def test_store_kv_skips_slot_minus_one():
    block_size, num_blocks = 4, 5
    cache = new_cache(num_blocks, block_size)
    before = cache.clone()
    slots = torch.tensor([-1, 7, -1, 2, -1], dtype=torch.int64)  # -1 must not wrap round to the last slot
    gen = torch.Generator().manual_seed(10)
    k = torch.randn(5, NUM_KV_HEADS, HEAD_DIM, generator=gen)
    v = torch.randn(5, NUM_KV_HEADS, HEAD_DIM, generator=gen)
    store_kv(k, v, cache, slots)
    expected = before.clone()
    expected[0].view(-1, NUM_KV_HEADS, HEAD_DIM)[[7, 2]] = k[[1, 3]]
    expected[1].view(-1, NUM_KV_HEADS, HEAD_DIM)[[7, 2]] = v[[1, 3]]
    assert torch.equal(cache, expected)


def test_store_kv_all_slots_minus_one_is_a_no_op():
    cache = new_cache(3, 4)
    before = cache.clone()
    k = torch.randn(4, NUM_KV_HEADS, HEAD_DIM)
    store_kv(k, k.clone(), cache, torch.full((4,), -1, dtype=torch.int64))
    assert torch.equal(cache, before)


def test_forward_with_padding_slots_leaves_cache_alone():
    # A token with slot -1 (e.g. padding) is not stored, and the others still are.
    block_size = 4
    pool = Pool(8)
    (seq,) = new_seqs([6], pool, block_size, seed=11)
    cache = new_cache(8, block_size)
    q, k, v, context = make_step([(seq, 0, 6)], block_size)
    real = context.slot_mapping.clone()
    context.slot_mapping[5] = -1
    before = cache.clone()
    backend().forward(q, k, v, cache, context)
    flat = cache.view(2, -1, NUM_KV_HEADS, HEAD_DIM)
    assert torch.equal(flat[0, real[:5]], k[:5]) and torch.equal(flat[1, real[:5]], v[:5])
    others = torch.ones(flat.size(1), dtype=torch.bool)
    others[real[:5]] = False
    assert torch.equal(flat[:, others], before.view(2, -1, NUM_KV_HEADS, HEAD_DIM)[:, others])


# ---- selection ------------------------------------------------------------------------------

CPU = Platform("cpu", "x86_64")
MPS = Platform("mps", "Apple MPS")
CUDA_PLATFORMS = [Platform("cuda", "NVIDIA H100", (9, 0), 80 * 2**30),
                  Platform("cuda", "NVIDIA A100", (8, 0), 40 * 2**30),
                  Platform("cuda", "Tesla V100", (7, 0), 16 * 2**30)]


@pytest.mark.parametrize("platform", [CPU, MPS], ids=["cpu", "mps"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("by_name", [False, True])
def test_picked_on_cpu_and_mps(platform, dtype, by_name):
    for head_dim, block_size in [(16, 4), (64, 16), (128, 256), (80, 8)]:
        assert TorchPagedAttention.unsupported_reason(platform, dtype, head_dim, block_size, by_name=by_name) is None


@pytest.mark.parametrize("platform", CUDA_PLATFORMS, ids=lambda p: p.name)
def test_on_cuda_only_by_name(platform):
    reason = TorchPagedAttention.unsupported_reason(platform, torch.bfloat16, 128, 16)
    assert isinstance(reason, str) and reason
    assert TorchPagedAttention.unsupported_reason(platform, torch.bfloat16, 128, 16, by_name=True) is None


def test_not_on_unknown_devices():
    xpu = Platform("xpu", "Intel GPU")
    assert TorchPagedAttention.unsupported_reason(xpu, torch.float32, 64, 16)
    assert TorchPagedAttention.unsupported_reason(xpu, torch.float32, 64, 16, by_name=True)


def test_selection_and_registration(monkeypatch):
    monkeypatch.delenv("NANOVLLM_ATTENTION_BACKEND", raising=False)
    registered = []
    register_attention_backends(register=registered.append)
    assert registered == [TorchPagedAttention]
    backends = {TorchPagedAttention.name: TorchPagedAttention}
    assert select_backend(backends, CPU, torch.float32, 64, 16, requested=None)[0] is TorchPagedAttention
    assert select_backend(backends, MPS, torch.float16, 64, 16, requested=None)[0] is TorchPagedAttention
    with pytest.raises(RuntimeError):
        select_backend(backends, CUDA_PLATFORMS[0], torch.bfloat16, 64, 16, requested=None)
    assert select_backend(backends, CUDA_PLATFORMS[0], torch.bfloat16, 64, 16,
                          requested=TorchPagedAttention.name)[0] is TorchPagedAttention
