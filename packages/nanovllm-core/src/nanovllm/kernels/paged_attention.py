"""Paged attention in Triton: decode, prefix-cached and chunked prefill, and mixed batches over the paged KV
cache. The fa1 backend needs it (flash-attn 1 has no KV-cache API), so it uses only what Turing (sm75) has:
fp16 tensor-core dots, fp32 accumulation, no sm80+ instructions. The fa2 backend decodes with it too: on an
H200 it is faster than flash-attn 2's ``flash_attn_with_kvcache`` at batch 1 and 128 and within 4% of it in
between, and the throughput benchmark runs faster with it (benchmarks/RESULTS.md)."""
import torch
import triton
import triton.language as tl

from nanovllm.kernels import multiprocessors, shared_memory
from nanovllm.kernels.prompt_work import KEY_TILE, MIN_SPLIT_KEYS, PromptWork, prompt_work, tile_rows


@triton.jit
def _attend_key_tile(q, m_i, l_i, acc, k_cache_ptr, v_cache_ptr, slots, kv_head, offs_d, d_mask, offs_n, hi, q_pos,
                     scale_log2, NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, MASKED: tl.constexpr):
    """The tile of keys ``offs_n`` (at cache ``slots``) into the online softmax. MASKED: some rows do not see some
    of these keys (causality, or keys from ``hi`` on); else every row sees every key."""
    kv_offsets = slots[:, None] * (NUM_KV_HEADS * HEAD_DIM) + kv_head * HEAD_DIM + offs_d[None, :]
    if MASKED:
        n_mask = offs_n < hi
        kv_mask = n_mask[:, None] & d_mask[None, :]
    else:
        kv_mask = d_mask[None, :]
    k = tl.load(k_cache_ptr + kv_offsets, mask=kv_mask, other=0.0)
    v = tl.load(v_cache_ptr + kv_offsets, mask=kv_mask, other=0.0)
    qk = tl.dot(q, tl.trans(k))  # unscaled: the scale goes into exp2's one FMA below, as flash-attention does
    if MASKED:
        qk = tl.where((offs_n[None, :] <= q_pos[:, None]) & n_mask[None, :], qk, float("-inf"))
    # A row sees its split's first key or none of the split (the keys it sees are a prefix): then its maximum
    # is finite after the first tile, or it stays NaN and _attend_tile weighs it as having seen nothing.
    m_new = tl.maximum(m_i, tl.max(qk, 1))
    alpha = tl.exp2((m_i - m_new) * scale_log2)
    p = tl.exp2(qk * scale_log2 - (m_new * scale_log2)[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
    return m_new, l_i, acc


PAGES_AT_ONCE = tl.constexpr(16)


@triton.jit
def _attend_keys(q, m_i, l_i, acc, k_cache_ptr, v_cache_ptr, block_tables_ptr, seq, block_table_stride, kv_head,
                 offs_d, d_mask, q_pos, scale_log2, lo, hi, NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
                 PAGE: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr):
    """Online softmax of the tile's rows over keys lo..hi (lo a multiple of BLOCK_N). MASKED: some rows do not see
    some of these keys (causality, or hi not a multiple of BLOCK_N); else every row sees every key."""
    table = block_tables_ptr + seq * block_table_stride
    if PAGE % BLOCK_N == 0:  # whole tiles in a page: block ids loaded ahead, so no load in the key loop holds up K/V
        pages = tl.arange(0, PAGES_AT_ONCE)
        end_page = tl.cdiv(hi, PAGE)
        for first_page in range(lo // PAGE, end_page, PAGES_AT_ONCE):
            ids = tl.load(table + first_page + pages, mask=first_page + pages < end_page, other=0).to(tl.int64)
            for start in range(tl.maximum(lo, first_page * PAGE), tl.minimum(hi, (first_page + PAGES_AT_ONCE) * PAGE),
                               BLOCK_N):
                offs_n = start + tl.arange(0, BLOCK_N)
                block_id = tl.sum(tl.where(pages == start // PAGE - first_page, ids, 0))
                m_i, l_i, acc = _attend_key_tile(q, m_i, l_i, acc, k_cache_ptr, v_cache_ptr,
                                                 block_id * PAGE + offs_n % PAGE, kv_head, offs_d, d_mask, offs_n, hi,
                                                 q_pos, scale_log2, NUM_KV_HEADS, HEAD_DIM, MASKED)
    else:
        for start in range(lo, hi, BLOCK_N):
            offs_n = start + tl.arange(0, BLOCK_N)
            block_ids = tl.load(table + offs_n // PAGE, mask=offs_n < hi, other=0)
            m_i, l_i, acc = _attend_key_tile(q, m_i, l_i, acc, k_cache_ptr, v_cache_ptr,
                                             block_ids.to(tl.int64) * PAGE + offs_n % PAGE, kv_head, offs_d, d_mask,
                                             offs_n, hi, q_pos, scale_log2, NUM_KV_HEADS, HEAD_DIM, MASKED)
    return m_i, l_i, acc


@triton.jit
def _attend_tile(q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, q_stride_t, q_stride_h, block_table_stride,
                 scale_log2, seq, q_start, q_len, first, k_len, kv_head, lo, hi, NUM_KV_HEADS: tl.constexpr,
                 GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, PAGE: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Sequence ``seq``'s query tokens from ``first`` (a tile of them) for one KV head over its keys lo..hi (lo a
    multiple of BLOCK_N). A tile's rows are its tokens times the GROUP query heads that share the KV head, so each
    K/V tile is read once for all of them. Returns the rows' outputs, their log-sum-exp (-inf for a row that saw
    no key: its output is zeros, not 0 / 0), and each row's token, head and whether it is one."""
    TOKENS: tl.constexpr = BLOCK_M // GROUP
    rows = tl.arange(0, BLOCK_M)
    token = first + rows // GROUP
    head = kv_head * GROUP + rows % GROUP
    offs_d = tl.arange(0, BLOCK_D)
    m_mask = (token < q_len) & (rows < TOKENS * GROUP)
    d_mask = offs_d < HEAD_DIM
    q = tl.load(q_ptr + (q_start + token)[:, None] * q_stride_t + head[:, None] * q_stride_h + offs_d[None, :],
                mask=m_mask[:, None] & d_mask[None, :], other=0.0)
    q_pos = k_len - q_len + token  # each query's position: it sees keys up to there
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    # key tiles up to the tile's first query's position are seen by every row: no mask there
    seen_by_all = tl.minimum(hi, tl.maximum(lo, (k_len - q_len + first + 1) // BLOCK_N * BLOCK_N))
    m_i, l_i, acc = _attend_keys(q, m_i, l_i, acc, k_cache_ptr, v_cache_ptr, block_tables_ptr, seq,
                                 block_table_stride, kv_head, offs_d, d_mask, q_pos, scale_log2, lo, seen_by_all,
                                 NUM_KV_HEADS, HEAD_DIM, PAGE, BLOCK_N, False)
    m_i, l_i, acc = _attend_keys(q, m_i, l_i, acc, k_cache_ptr, v_cache_ptr, block_tables_ptr, seq,
                                 block_table_stride, kv_head, offs_d, d_mask, q_pos, scale_log2, seen_by_all, hi,
                                 NUM_KV_HEADS, HEAD_DIM, PAGE, BLOCK_N, True)
    out = tl.where(l_i[:, None] > 0, acc / l_i[:, None], 0.0)
    lse = m_i * scale_log2 * 0.6931471805599453 + tl.log(l_i)  # natural log; m_i is of unscaled Q K^T
    return out, tl.where(l_i > 0, lse, float("-inf")), q_start + token, head, m_mask


@triton.jit
def _write_tile(out_ptr, partial_ptr, lse_ptr, out, lse, token, head, m_mask, partial_row, split, o_stride_t,
                o_stride_h, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    """A tile's rows (of _attend_tile) into the output or, for a split of the keys, with their log-sum-exp into
    the partial outputs' rows ``partial_row``."""
    offs_d = tl.arange(0, BLOCK_D)
    mask = m_mask[:, None] & (offs_d < HEAD_DIM)[None, :]
    if split:
        tl.store(partial_ptr + partial_row[:, None] * HEAD_DIM + offs_d[None, :], out, mask=mask)
        tl.store(lse_ptr + partial_row, lse, mask=m_mask)
    else:
        tl.store(out_ptr + token[:, None] * o_stride_t + head[:, None] * o_stride_h + offs_d[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _decode_kernel(q_ptr, k_cache_ptr, v_cache_ptr, out_ptr, partial_ptr, lse_ptr, context_lens_ptr,
                   block_tables_ptr, q_stride_t, q_stride_h, o_stride_t, o_stride_h, block_table_stride, num_seqs,
                   num_heads, scale_log2, NUM_KV_HEADS: tl.constexpr, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr,
                   BLOCK_D: tl.constexpr, PAGE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   SPLITS: tl.constexpr, MIN_SPLIT_KEYS: tl.constexpr):
    """One program per (sequence, KV head, split of the keys). With SPLITS > 1 each writes its split's output and
    log-sum-exp for _combine_splits_kernel (a split past a short sequence's keys, its log-sum-exp only)."""
    seq, kv_head, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    k_len = tl.load(context_lens_ptr + seq)
    # a split reads at least MIN_SPLIT_KEYS keys: short sequences use fewer splits than they are given
    chunk = tl.maximum(tl.cdiv(tl.cdiv(k_len, SPLITS), BLOCK_N) * BLOCK_N, MIN_SPLIT_KEYS)
    lo = split * chunk
    out, lse, token, head, m_mask = _attend_tile(
        q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, q_stride_t, q_stride_h, block_table_stride, scale_log2,
        seq, seq, 1, 0, k_len, kv_head, lo, tl.minimum(k_len, lo + chunk), NUM_KV_HEADS, GROUP, HEAD_DIM, BLOCK_D,
        PAGE, BLOCK_M, BLOCK_N)
    _write_tile(out_ptr, partial_ptr, lse_ptr, out, lse, token, head, m_mask,
                (split * num_seqs + token) * num_heads + head, SPLITS > 1, o_stride_t, o_stride_h, HEAD_DIM, BLOCK_D)


@triton.jit
def _prompt_kernel(q_ptr, k_cache_ptr, v_cache_ptr, out_ptr, partial_ptr, lse_ptr, items_ptr, cu_seqlens_q_ptr,
                   context_lens_ptr, block_tables_ptr, q_stride_t, q_stride_h, o_stride_t, o_stride_h,
                   block_table_stride, scale_log2, NUM_KV_HEADS: tl.constexpr, GROUP: tl.constexpr,
                   HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, PAGE: tl.constexpr, BLOCK_M: tl.constexpr,
                   BLOCK_N: tl.constexpr):
    """The programs of a KV head take the step's planned items in turn (prompt_work.plan): a tile of a sequence's
    query tokens over a range of its keys. A whole tile's output is written at once; a split's, with its
    log-sum-exp, goes to its slot of partial outputs for _combine_tiles_kernel."""
    kv_head = tl.program_id(1)
    rows = tl.arange(0, BLOCK_M)
    for i in range(tl.program_id(0), tl.load(items_ptr), tl.num_programs(0)):
        item = items_ptr + 5 * (i + 1)
        seq = tl.load(item)
        first, lo, hi, slot = tl.load(item + 1), tl.load(item + 2), tl.load(item + 3), tl.load(item + 4)
        q_start = tl.load(cu_seqlens_q_ptr + seq)
        q_len = tl.load(cu_seqlens_q_ptr + seq + 1) - q_start
        out, lse, token, head, m_mask = _attend_tile(
            q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, q_stride_t, q_stride_h, block_table_stride,
            scale_log2, seq, q_start, q_len, first, tl.load(context_lens_ptr + seq), kv_head, lo, hi,
            NUM_KV_HEADS, GROUP, HEAD_DIM, BLOCK_D, PAGE, BLOCK_M, BLOCK_N)
        _write_tile(out_ptr, partial_ptr, lse_ptr, out, lse, token, head, m_mask,
                    (slot * NUM_KV_HEADS + kv_head) * BLOCK_M + rows, slot >= 0, o_stride_t, o_stride_h, HEAD_DIM,
                    BLOCK_D)


@triton.jit
def _combine_tiles_kernel(partial_ptr, lse_ptr, out_ptr, combines_ptr, cu_seqlens_q_ptr, o_stride_t, o_stride_h,
                          NUM_KV_HEADS: tl.constexpr, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr,
                          BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr):
    """The output of each tile whose keys were split: its splits' outputs weighted by exp(their log-sum-exp),
    for one KV head's rows (a split some rows saw no key of weighs nothing for them)."""
    TOKENS: tl.constexpr = BLOCK_M // GROUP
    kv_head = tl.program_id(1)
    rows = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    for i in range(tl.program_id(0), tl.load(combines_ptr), tl.num_programs(0)):
        tile = combines_ptr + 4 * (i + 1)
        seq, first, first_slot, slots = tl.load(tile), tl.load(tile + 1), tl.load(tile + 2), tl.load(tile + 3)
        q_start = tl.load(cu_seqlens_q_ptr + seq)
        token = first + rows // GROUP
        m_mask = (token < tl.load(cu_seqlens_q_ptr + seq + 1) - q_start) & (rows < TOKENS * GROUP)
        mask = m_mask[:, None] & (offs_d < HEAD_DIM)[None, :]
        top = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        for slot in range(first_slot, first_slot + slots):
            top = tl.maximum(top, tl.load(lse_ptr + (slot * NUM_KV_HEADS + kv_head) * BLOCK_M + rows))
        total = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        for slot in range(first_slot, first_slot + slots):
            at = (slot * NUM_KV_HEADS + kv_head) * BLOCK_M + rows
            lse = tl.load(lse_ptr + at)
            weight = tl.where(lse > float("-inf"), tl.exp(lse - top), 0.0)
            total += weight
            acc += weight[:, None] * tl.load(partial_ptr + at[:, None] * HEAD_DIM + offs_d[None, :],
                                             mask=mask & (lse > float("-inf"))[:, None], other=0.0)
        head = kv_head * GROUP + rows % GROUP
        tl.store(out_ptr + (q_start + token)[:, None] * o_stride_t + head[:, None] * o_stride_h + offs_d[None, :],
                 (acc / tl.where(total > 0, total, 1.0)[:, None]).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _combine_splits_kernel(partial_ptr, lse_ptr, out_ptr, num_seqs, num_heads, o_stride_t, o_stride_h,
                           HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, SPLITS: tl.constexpr,
                           BLOCK_S: tl.constexpr):
    """A decode's out = its splits' outputs weighted by exp(their log-sum-exp), for one (sequence, head); splits
    that saw no key (a short sequence's, a CUDA graph's padding rows) are not loaded."""
    token = tl.program_id(0)
    head = tl.program_id(1)
    splits = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    at = (splits * num_seqs + token) * num_heads + head
    lse = tl.load(lse_ptr + at, mask=splits < SPLITS, other=float("-inf"))
    seen = lse > float("-inf")
    weight = tl.where(seen, tl.exp(lse - tl.max(lse, 0)), 0.0)
    partial = tl.load(partial_ptr + at[:, None] * HEAD_DIM + offs_d[None, :],
                      mask=seen[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)
    total = tl.sum(weight, 0)
    out = tl.sum(partial * weight[:, None], 0) / tl.where(total > 0, total, 1.0)
    tl.store(out_ptr + token * o_stride_t + head * o_stride_h + offs_d, out.to(out_ptr.dtype.element_ty),
             mask=offs_d < HEAD_DIM)


def key_splits(num_seqs: int, num_kv_heads: int, device: torch.device) -> int:
    """Splits of a decode's keys, so that a small batch still has programs for every SM (some eight per SM) and
    one long sequence among short ones is read by many SMs (a CUDA graph fixes the splits before the lengths are
    known; a short sequence's unused splits end at once)."""
    if device.type != "cuda":
        return 1
    return max(1, min(16, 8 * multiprocessors(device) // (num_seqs * num_kv_heads)))


def tile_config(block_m: int, block_d: int, decode: bool, device: torch.device) -> dict:
    """Keys per K/V tile and pipeline stages: 64 keys, in 4 stages for a decode and 3 for prompt tokens (on an H100
    up to 1.12x faster than 3 and 2, at most 1% slower: benchmarks/RESULTS.md) where the stages of K and V tiles fit
    in shared memory beside the query tile, else fewer (on a Turing GPU at head size 128: 32 keys in 2 stages)."""
    if device.type != "cuda":  # Triton's CPU interpreter: stages do not apply
        return dict(BLOCK_N=KEY_TILE)
    shared = shared_memory(device)
    for block_n, stages in ((64, 4), (64, 3), (64, 2), (32, 2), (16, 2))[0 if decode else 1:]:
        if (stages * 2 * block_n + 2 * block_m) * block_d * 2 <= shared:  # K, V stages; Q and a margin as large
            return dict(BLOCK_N=block_n, num_stages=stages)
    return dict(BLOCK_N=16, num_stages=1)


def paged_attention(q: torch.Tensor, kv_cache: torch.Tensor, cu_seqlens_q: torch.Tensor, context_lens: torch.Tensor,
                    block_tables: torch.Tensor, max_seqlen_q: int, scale: float, splits: int | None = None,
                    work: PromptWork | None = None) -> torch.Tensor:
    """Causal attention of each sequence's new queries over its paged cache (new keys already stored).

    q: [tokens, heads, head_dim]; kv_cache: [2, blocks, page, kv_heads, head_dim]. Returns [tokens, heads, head_dim].
    A decode (max_seqlen_q 1: sequence i's one query token in row i) splits each sequence's keys in ``splits``
    parts (default: ``key_splits``). Steps with prompt tokens run ``work``, the step's plan (prompt_work.py; the
    engine makes it on the host with the step's other inputs); without it, it is planned here from the lengths,
    which waits for the GPU.
    """
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads, page = kv_cache.shape[3], kv_cache.shape[2]
    num_seqs, group = cu_seqlens_q.numel() - 1, num_heads // num_kv_heads
    block_d = max(16, triton.next_power_of_2(head_dim))
    out = torch.empty_like(q)
    args = (q.stride(0), q.stride(1), out.stride(0), out.stride(1), block_tables.stride(0))
    scale_log2 = scale * 1.4426950408889634  # times log2(e): the kernel's softmax is exp2
    if max_seqlen_q == 1:
        block_m = max(16, triton.next_power_of_2(group))  # the smallest tile tensor-core dots take
        splits = splits or key_splits(num_seqs, num_kv_heads, q.device)
        partial, lse = out, out  # each split's output and log-sum-exp, when there are splits
        if splits > 1:
            partial = torch.empty(splits, num_seqs, num_heads, head_dim, dtype=torch.float32, device=q.device)
            lse = torch.empty(splits, num_seqs, num_heads, dtype=torch.float32, device=q.device)
        _decode_kernel[(num_seqs, num_kv_heads, splits)](
            q, kv_cache[0], kv_cache[1], out, partial, lse, context_lens, block_tables, *args, num_seqs, num_heads,
            scale_log2, NUM_KV_HEADS=num_kv_heads, GROUP=group, HEAD_DIM=head_dim, BLOCK_D=block_d, PAGE=page,
            BLOCK_M=block_m, SPLITS=splits, MIN_SPLIT_KEYS=MIN_SPLIT_KEYS,
            **tile_config(block_m, block_d, True, q.device))
        if splits > 1:
            _combine_splits_kernel[(num_seqs, num_heads)](
                partial, lse, out, num_seqs, num_heads, out.stride(0), out.stride(1), HEAD_DIM=head_dim,
                BLOCK_D=block_d, SPLITS=splits, BLOCK_S=triton.next_power_of_2(splits))
        return out
    if work is None:
        work = prompt_work(cu_seqlens_q.diff().cpu().numpy(), context_lens.cpu().numpy(), num_heads, num_kv_heads,
                           q.device)
    block_m = tile_rows(group)
    slots = 2 * work.programs
    partial = torch.empty(slots, num_kv_heads, block_m, head_dim, dtype=torch.float32, device=q.device)
    lse = torch.empty(slots, num_kv_heads, block_m, dtype=torch.float32, device=q.device)
    meta = dict(NUM_KV_HEADS=num_kv_heads, GROUP=group, HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_M=block_m)
    _prompt_kernel[(work.programs, num_kv_heads)](
        q, kv_cache[0], kv_cache[1], out, partial, lse, work.items, cu_seqlens_q, context_lens, block_tables, *args,
        scale_log2, PAGE=page, **meta, **tile_config(block_m, block_d, False, q.device))
    _combine_tiles_kernel[(work.programs, num_kv_heads)](partial, lse, out, work.combines, cu_seqlens_q,
                                                         out.stride(0), out.stride(1), **meta)
    return out
