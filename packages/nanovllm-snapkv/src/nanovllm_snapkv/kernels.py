"""SnapKV's scores in two Triton passes over the keys, nothing materialised but the scores: the first finds each
window query's softmax normaliser (online, as flash attention does), the second sums each key's probabilities
over the window's queries and the query heads of its KV head."""
import torch
import triton
import triton.language as tl

BLOCK_ROWS, BLOCK_KEYS = 64, 64


@triton.jit
def _normalisers(q_ptr, k_ptr, lse_ptr, num_rows, num_keys, window, scale, stride_qh, stride_qr, stride_kt, stride_kh,
                 HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    head = tl.program_id(0)
    rows = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    dims = tl.arange(0, BLOCK_D)
    q = tl.load(q_ptr + head * stride_qh + rows[:, None] * stride_qr + dims[None, :],
                mask=(rows[:, None] < num_rows) & (dims[None, :] < HEAD_DIM), other=0.0)
    query_positions = num_keys - window + rows % window  # row g * window + w is query w of head g of the group
    top = tl.full([BLOCK_R], float("-inf"), tl.float32)
    total = tl.zeros([BLOCK_R], tl.float32)
    for start in range(0, num_keys, BLOCK_K):
        keys = start + tl.arange(0, BLOCK_K)
        k = tl.load(k_ptr + keys[None, :] * stride_kt + head * stride_kh + dims[:, None],
                    mask=(keys[None, :] < num_keys) & (dims[:, None] < HEAD_DIM), other=0.0)
        logits = tl.dot(q, k) * scale
        logits = tl.where(keys[None, :] <= query_positions[:, None], logits, float("-inf"))  # causal in the window
        new_top = tl.maximum(top, tl.max(logits, 1))  # finite from the first block on: key 0 is always visible
        total = total * tl.exp(top - new_top) + tl.sum(tl.exp(logits - new_top[:, None]), 1)
        top = new_top
    tl.store(lse_ptr + head * num_rows + rows, top + tl.log(total), mask=rows < num_rows)


@triton.jit
def _scores(q_ptr, k_ptr, lse_ptr, out_ptr, num_rows, num_keys, window, scale, stride_qh, stride_qr, stride_kt,
            stride_kh, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    head = tl.program_id(0)
    keys = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    dims = tl.arange(0, BLOCK_D)
    k = tl.load(k_ptr + keys[None, :] * stride_kt + head * stride_kh + dims[:, None],
                mask=(keys[None, :] < num_keys) & (dims[:, None] < HEAD_DIM), other=0.0)
    acc = tl.zeros([BLOCK_K], tl.float32)
    for start in range(0, num_rows, BLOCK_R):
        rows = start + tl.arange(0, BLOCK_R)
        q = tl.load(q_ptr + head * stride_qh + rows[:, None] * stride_qr + dims[None, :],
                    mask=(rows[:, None] < num_rows) & (dims[None, :] < HEAD_DIM), other=0.0)
        lse = tl.load(lse_ptr + head * num_rows + rows, mask=rows < num_rows, other=float("inf"))
        query_positions = num_keys - window + rows % window
        probs = tl.exp(tl.dot(q, k) * scale - lse[:, None])
        probs = tl.where((keys[None, :] <= query_positions[:, None]) & (rows[:, None] < num_rows), probs, 0.0)
        acc += tl.sum(probs, 0)
    tl.store(out_ptr + head * num_keys + keys, acc, mask=keys < num_keys)


def window_attention(queries: torch.Tensor, keys: torch.Tensor, scale: float) -> torch.Tensor:
    """As ``nanovllm_snapkv.window_attention``: float32 [kv_heads, num_keys]. Dots run in the keys' dtype with
    float32 accumulation."""
    window, num_heads, dim = queries.shape
    num_keys, num_kv_heads, _ = keys.shape
    group = num_heads // num_kv_heads
    q = queries.to(keys.dtype).view(window, num_kv_heads, group, dim).permute(1, 2, 0, 3).reshape(num_kv_heads, -1, dim)
    num_rows = q.size(1)
    lse = torch.empty(num_kv_heads, num_rows, dtype=torch.float32, device=keys.device)
    scores = torch.empty(num_kv_heads, num_keys, dtype=torch.float32, device=keys.device)
    shape = dict(HEAD_DIM=dim, BLOCK_D=max(16, triton.next_power_of_2(dim)), BLOCK_R=BLOCK_ROWS, BLOCK_K=BLOCK_KEYS)
    args = (num_rows, num_keys, window, scale, q.stride(0), q.stride(1), keys.stride(0), keys.stride(1))
    _normalisers[(num_kv_heads, triton.cdiv(num_rows, BLOCK_ROWS))](q, keys, lse, *args, **shape)
    _scores[(num_kv_heads, triton.cdiv(num_keys, BLOCK_KEYS))](q, keys, lse, scores, *args, **shape)
    return scores
