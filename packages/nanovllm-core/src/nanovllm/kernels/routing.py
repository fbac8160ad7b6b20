"""A MoE router's softmax, top-k and renormalisation in one Triton kernel (in torch they are three to five
kernels, topk alone two, of a few microseconds each in every MoE layer of a decode step)."""
import torch
import triton
import triton.language as tl


@triton.jit
def _top_k_routing_kernel(logits_ptr, weights_ptr, ids_ptr, tokens, num_experts, stride_logits,
                          TOP_K: tl.constexpr, NORMALIZE: tl.constexpr, BLOCK_T: tl.constexpr,
                          EXPERTS: tl.constexpr, K_SLOTS: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    experts = tl.arange(0, EXPERTS)
    is_expert = experts[None, :] < num_experts
    logits = tl.load(logits_ptr + rows[:, None] * stride_logits + experts[None, :],
                     mask=(rows[:, None] < tokens) & is_expert, other=0.0).to(tl.float32)
    logits = tl.where(is_expert, logits, float("-inf"))
    probs = tl.exp(logits - tl.max(logits, axis=1)[:, None])
    probs = probs / tl.sum(probs, axis=1)[:, None]
    slots = tl.arange(0, K_SLOTS)
    top_weights = tl.zeros([BLOCK_T, K_SLOTS], dtype=tl.float32)
    top_ids = tl.zeros([BLOCK_T, K_SLOTS], dtype=tl.int32)
    for j in tl.static_range(TOP_K):  # take the largest, then hide it
        best = tl.max(probs, axis=1)
        best_id = tl.min(tl.where(probs == best[:, None], experts[None, :], EXPERTS), axis=1)
        best_id = tl.minimum(best_id, num_experts - 1)  # a NaN row matches nothing: still name a real expert
        top_weights = tl.where(slots[None, :] == j, best[:, None], top_weights)
        top_ids = tl.where(slots[None, :] == j, best_id[:, None], top_ids)
        probs = tl.where(experts[None, :] == best_id[:, None], -1.0, probs)
    if NORMALIZE:
        top_weights = top_weights / tl.sum(top_weights, axis=1)[:, None]
    out = rows[:, None] * TOP_K + slots[None, :]
    mask = (rows[:, None] < tokens) & (slots[None, :] < TOP_K)
    tl.store(weights_ptr + out, top_weights, mask=mask)
    tl.store(ids_ptr + out, top_ids, mask=mask)


def top_k_routing(logits: torch.Tensor, top_k: int, normalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """logits: [tokens, E]. Returns the top-k softmax weights (float32, renormalised to sum to one if
    ``normalize``) and expert ids (int64), [tokens, top_k] each, largest first."""
    tokens, num_experts = logits.shape
    weights = torch.empty(tokens, top_k, dtype=torch.float32, device=logits.device)
    ids = torch.empty(tokens, top_k, dtype=torch.int64, device=logits.device)
    block_t = 16
    _top_k_routing_kernel[(triton.cdiv(tokens, block_t),)](
        logits, weights, ids, tokens, num_experts, logits.stride(0), TOP_K=top_k, NORMALIZE=normalize,
        BLOCK_T=block_t, EXPERTS=triton.next_power_of_2(num_experts), K_SLOTS=triton.next_power_of_2(top_k))
    return weights, ids
