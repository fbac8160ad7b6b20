"""Paged attention in Triton: decode, prefix-cached and chunked prefill, and mixed batches over the paged KV
cache. The fa1 backend needs it (flash-attn 1 has no KV-cache API), so it uses only what Turing (sm75) has:
fp16 tensor-core dots, fp32 accumulation, no sm80+ instructions. The fa2 backend decodes with it too: on an
H200 it is faster than flash-attn 2's ``flash_attn_with_kvcache`` at batch 1 and 128 and within 4% of it in
between, and the throughput benchmark runs faster with it (benchmarks/RESULTS.md)."""
import torch
import triton
import triton.language as tl

from nanovllm.kernels import multiprocessors, shared_memory


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
def _attend_tile(q_ptr, k_cache_ptr, v_cache_ptr, out_ptr, partial_ptr, lse_ptr, cu_seqlens_q_ptr, context_lens_ptr,
                 block_tables_ptr, q_stride_t, q_stride_h, o_stride_t, o_stride_h, block_table_stride, num_tokens,
                 num_heads, scale_log2, seq, first, kv_head, split, NUM_KV_HEADS: tl.constexpr, GROUP: tl.constexpr,
                 HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, PAGE: tl.constexpr, BLOCK_M: tl.constexpr,
                 BLOCK_N: tl.constexpr, SPLITS: tl.constexpr, MIN_SPLIT_KEYS: tl.constexpr):
    """Sequence ``seq``'s query tokens from ``first`` (a tile of them) for one KV head over one split of the keys.
    A tile's rows are its tokens times the GROUP query heads that share the KV head, so each K/V tile is read
    once for all of them. With SPLITS > 1 it writes the split's output and log-sum-exp for
    _combine_splits_kernel."""
    TOKENS: tl.constexpr = BLOCK_M // GROUP
    q_start = tl.load(cu_seqlens_q_ptr + seq)
    q_len = tl.load(cu_seqlens_q_ptr + seq + 1) - q_start
    if first < q_len:
        k_len = tl.load(context_lens_ptr + seq)
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
        end = tl.minimum(k_len, k_len - q_len + first + TOKENS)
        # a split reads at least MIN_SPLIT_KEYS keys: short sequences use fewer splits than they are given
        chunk = tl.maximum(tl.cdiv(tl.cdiv(end, SPLITS), BLOCK_N) * BLOCK_N, MIN_SPLIT_KEYS)
        lo = split * chunk
        hi = tl.minimum(end, (split + 1) * chunk)
        # key tiles up to the tile's first query's position are seen by every row: no mask there
        seen_by_all = tl.minimum(hi, tl.maximum(lo, (k_len - q_len + first + 1) // BLOCK_N * BLOCK_N))
        m_i, l_i, acc = _attend_keys(q, m_i, l_i, acc, k_cache_ptr, v_cache_ptr, block_tables_ptr, seq,
                                     block_table_stride, kv_head, offs_d, d_mask, q_pos, scale_log2, lo, seen_by_all,
                                     NUM_KV_HEADS, HEAD_DIM, PAGE, BLOCK_N, False)
        m_i, l_i, acc = _attend_keys(q, m_i, l_i, acc, k_cache_ptr, v_cache_ptr, block_tables_ptr, seq,
                                     block_table_stride, kv_head, offs_d, d_mask, q_pos, scale_log2, seen_by_all, hi,
                                     NUM_KV_HEADS, HEAD_DIM, PAGE, BLOCK_N, True)
        mask = m_mask[:, None] & d_mask[None, :]
        # A row that saw no key (a CUDA graph's padding has context length 0) gets zeros, not 0 / 0 or NaN
        out = tl.where(l_i[:, None] > 0, acc / l_i[:, None], 0.0)
        if SPLITS == 1:
            tl.store(out_ptr + (q_start + token)[:, None] * o_stride_t + head[:, None] * o_stride_h + offs_d[None, :],
                     out.to(out_ptr.dtype.element_ty), mask=mask)
        else:  # and a split that saw no key weighs nothing in the combination
            at = (split * num_tokens + q_start + token) * num_heads + head
            tl.store(partial_ptr + at[:, None] * HEAD_DIM + offs_d[None, :], out, mask=mask)
            lse = m_i * scale_log2 * 0.6931471805599453 + tl.log(l_i)  # natural log; m_i is of unscaled Q K^T
            tl.store(lse_ptr + at, tl.where(l_i > 0, lse, float("-inf")), mask=m_mask)


@triton.jit
def _paged_attention_kernel(q_ptr, k_cache_ptr, v_cache_ptr, out_ptr, partial_ptr, lse_ptr, cu_seqlens_q_ptr,
                            context_lens_ptr, block_tables_ptr, q_stride_t, q_stride_h, o_stride_t, o_stride_h,
                            block_table_stride, num_tokens, num_heads, num_seqs, scale_log2, NUM_KV_HEADS: tl.constexpr,
                            GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, PAGE: tl.constexpr,
                            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SPLITS: tl.constexpr,
                            MIN_SPLIT_KEYS: tl.constexpr, DECODE: tl.constexpr):
    """A decode has one program per (sequence, KV head, split of the keys). Otherwise a fixed number of programs
    per KV head take turns over the (tile of query tokens, split) pairs of the step: the tiles are numbered across
    the batch (sequence i's from cu_seqlens_q[i] // TOKENS + i) and counted over the step's own sequences only, so
    a CUDA graph holds the grid and its padding (empty sequences past the step's) costs no program."""
    kv_head = tl.program_id(1)
    if DECODE:
        _attend_tile(q_ptr, k_cache_ptr, v_cache_ptr, out_ptr, partial_ptr, lse_ptr, cu_seqlens_q_ptr,
                     context_lens_ptr, block_tables_ptr, q_stride_t, q_stride_h, o_stride_t, o_stride_h,
                     block_table_stride, num_tokens, num_heads, scale_log2, tl.program_id(0), 0, kv_head,
                     tl.program_id(2), NUM_KV_HEADS, GROUP, HEAD_DIM, BLOCK_D, PAGE, BLOCK_M, BLOCK_N, SPLITS,
                     MIN_SPLIT_KEYS)
    else:
        TOKENS: tl.constexpr = BLOCK_M // GROUP
        total = tl.load(cu_seqlens_q_ptr + num_seqs)
        lo = 0
        hi = num_seqs
        while lo < hi:  # the step's sequences: those before the first that starts at the total (none is empty)
            mid = (lo + hi) // 2
            if tl.load(cu_seqlens_q_ptr + mid) < total:
                lo = mid + 1
            else:
                hi = mid
        last = lo - 1
        for work in range(tl.program_id(0), (total // TOKENS + lo) * SPLITS, tl.num_programs(0)):
            tile = work // SPLITS
            seq = 0
            hi = last
            while seq < hi:  # the last sequence whose first tile is at or before this one
                mid = (seq + hi + 1) // 2
                if tl.load(cu_seqlens_q_ptr + mid) // TOKENS + mid <= tile:
                    seq = mid
                else:
                    hi = mid - 1
            first = (tile - tl.load(cu_seqlens_q_ptr + seq) // TOKENS - seq) * TOKENS
            _attend_tile(q_ptr, k_cache_ptr, v_cache_ptr, out_ptr, partial_ptr, lse_ptr, cu_seqlens_q_ptr,
                         context_lens_ptr, block_tables_ptr, q_stride_t, q_stride_h, o_stride_t, o_stride_h,
                         block_table_stride, num_tokens, num_heads, scale_log2, seq, first, kv_head, work % SPLITS,
                         NUM_KV_HEADS, GROUP, HEAD_DIM, BLOCK_D, PAGE, BLOCK_M, BLOCK_N, SPLITS, MIN_SPLIT_KEYS)


@triton.jit
def _combine_splits_kernel(partial_ptr, lse_ptr, out_ptr, cu_seqlens_q_ptr, num_seqs, num_tokens, num_heads,
                           o_stride_t, o_stride_h, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                           SPLITS: tl.constexpr, BLOCK_S: tl.constexpr):
    """out = the splits' outputs weighted by exp(their log-sum-exp), for one (token, head). A CUDA graph's padding
    tokens (past the step's own) are skipped, and so are the partial outputs of splits that saw no key: a short
    sequence's, or a decode's in a step with a long prompt chunk."""
    token = tl.program_id(0)
    head = tl.program_id(1)
    if token < tl.load(cu_seqlens_q_ptr + num_seqs):
        splits = tl.arange(0, BLOCK_S)
        offs_d = tl.arange(0, BLOCK_D)
        at = (splits * num_tokens + token) * num_heads + head
        lse = tl.load(lse_ptr + at, mask=splits < SPLITS, other=float("-inf"))
        seen = lse > float("-inf")  # none for a CUDA graph's padding rows
        weight = tl.where(seen, tl.exp(lse - tl.max(lse, 0)), 0.0)
        partial = tl.load(partial_ptr + at[:, None] * HEAD_DIM + offs_d[None, :],
                          mask=seen[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)
        total = tl.sum(weight, 0)
        out = tl.sum(partial * weight[:, None], 0) / tl.where(total > 0, total, 1.0)
        tl.store(out_ptr + token * o_stride_t + head * o_stride_h + offs_d, out.to(out_ptr.dtype.element_ty),
                 mask=offs_d < HEAD_DIM)


MIN_SPLIT_KEYS = 512  # fewer keys per split cost more in programs and partial outputs than they save


def key_splits(num_tiles: int, num_kv_heads: int, decode: bool, device: torch.device) -> int:
    """Splits of the keys, so that a step with few query tiles (a small decode batch, a short prompt chunk) still
    has programs for every SM and one long sequence among short ones is read by many SMs (a CUDA graph fixes the
    splits before the lengths are known; a short sequence's unused splits end at once). Decodes: some eight
    programs per SM. Prompt tokens, measured on an H100 (benchmarks/RESULTS.md): a power of two up to some four
    per SM (3 splits were slower than 2 in most steps, never faster than both 2 and 4), and at least 2 below
    twelve (query tile, KV head) pairs per SM (at 32/8 heads, 2,032 tokens over 7,000 keys ran 1.18x faster in 2
    splits; at 16/8 heads, a 1,024-token prompt ran 1.24x slower)."""
    if device.type != "cuda":
        return 1
    sms, work = multiprocessors(device), num_tiles * num_kv_heads
    if decode:
        return max(1, min(16, 8 * sms // work))
    splits = 1 << max(0, (4 * sms // work).bit_length() - 1)
    return min(16, max(2, splits) if work < 12 * sms else splits)


def programs_per_kv_head(num_kv_heads: int, splits: int, device: torch.device) -> int:
    """Programs that take turns over a step's (query tile, split) pairs. Some eight per SM, which balance a step of
    many tiles of unequal cost (prompts alone); two per SM (as many as fit at once) where the keys are split four
    ways or more, whose pairs cost about the same: on an H100 a 128-token chunk over 7,000 keys ran 1.18x faster
    (benchmarks/RESULTS.md). On CPU (Triton's interpreter) two, so that each takes several turns in the tests."""
    if device.type != "cuda":
        return 2
    return max(1, (2 if splits >= 4 else 8) * multiprocessors(device) // num_kv_heads)


def tile_config(block_m: int, block_d: int, decode: bool, device: torch.device) -> dict:
    """Keys per K/V tile and pipeline stages: 64 keys, in 4 stages for a decode and 3 for prompt tokens (on an H100
    up to 1.12x faster than 3 and 2, at most 1% slower: benchmarks/RESULTS.md) where the stages of K and V tiles fit
    in shared memory beside the query tile, else fewer (on a Turing GPU at head size 128: 32 keys in 2 stages)."""
    if device.type != "cuda":  # Triton's CPU interpreter: stages do not apply
        return dict(BLOCK_N=64)
    shared = shared_memory(device)
    for block_n, stages in ((64, 4), (64, 3), (64, 2), (32, 2), (16, 2))[0 if decode else 1:]:
        if (stages * 2 * block_n + 2 * block_m) * block_d * 2 <= shared:  # K, V stages; Q and a margin as large
            return dict(BLOCK_N=block_n, num_stages=stages)
    return dict(BLOCK_N=16, num_stages=1)


def paged_attention(q: torch.Tensor, kv_cache: torch.Tensor, cu_seqlens_q: torch.Tensor, context_lens: torch.Tensor,
                    block_tables: torch.Tensor, max_seqlen_q: int, scale: float, splits: int | None = None
                    ) -> torch.Tensor:
    """Causal attention of each sequence's new queries over its paged cache (new keys already stored).

    q: [tokens, heads, head_dim]; kv_cache: [2, blocks, page, kv_heads, head_dim]. Returns [tokens, heads, head_dim].
    ``splits``: how many parts each sequence's keys are split into (default: ``key_splits``).
    """
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads, page = kv_cache.shape[3], kv_cache.shape[2]
    num_seqs, group = cu_seqlens_q.numel() - 1, num_heads // num_kv_heads
    decode = max_seqlen_q == 1
    # 16 rows is the smallest tile tensor-core dots take (a decode fills GROUP of them); prefill chunks reuse
    # each K/V tile for more query tokens
    block_m = max(16 if decode else 64, triton.next_power_of_2(group))
    tokens_per_tile = block_m // group
    if splits is None:  # counting a prompt chunk's tiles, not the one each sequence may add
        num_tiles = num_seqs if decode else max(1, num_tokens // tokens_per_tile)
        splits = key_splits(num_tiles, num_kv_heads, decode, q.device)
    out = torch.empty_like(q)
    partial, lse = out, out  # each split's output and log-sum-exp, when there are splits
    if splits > 1:
        partial = torch.empty(splits, num_tokens, num_heads, head_dim, dtype=torch.float32, device=q.device)
        lse = torch.empty(splits, num_tokens, num_heads, dtype=torch.float32, device=q.device)
    block_d = max(16, triton.next_power_of_2(head_dim))
    if decode:
        grid = (num_seqs, num_kv_heads, splits)
    else:  # a sequence's first tile may straddle a multiple of the tile's tokens: one more tile per sequence
        work = (num_tokens // tokens_per_tile + num_seqs) * splits
        grid = (min(work, programs_per_kv_head(num_kv_heads, splits, q.device)), num_kv_heads, 1)
    _paged_attention_kernel[grid](
        q, kv_cache[0], kv_cache[1], out, partial, lse, cu_seqlens_q, context_lens, block_tables, q.stride(0),
        q.stride(1), out.stride(0), out.stride(1), block_tables.stride(0), num_tokens, num_heads, num_seqs,
        scale * 1.4426950408889634,  # times log2(e): the kernel's softmax is exp2
        NUM_KV_HEADS=num_kv_heads, GROUP=group, HEAD_DIM=head_dim, BLOCK_D=block_d, PAGE=page, BLOCK_M=block_m,
        SPLITS=splits, MIN_SPLIT_KEYS=MIN_SPLIT_KEYS, DECODE=decode, **tile_config(block_m, block_d, decode, q.device))
    if splits > 1:
        _combine_splits_kernel[(num_tokens, num_heads)](
            partial, lse, out, cu_seqlens_q, num_seqs, num_tokens, num_heads, out.stride(0), out.stride(1),
            HEAD_DIM=head_dim, BLOCK_D=block_d, SPLITS=splits, BLOCK_S=triton.next_power_of_2(splits))
    return out
