import torch
import torch.distributed as dist
from torch import nn

from nanovllm.layers.activation import silu_and_mul
from nanovllm.layers.linear import ReplicatedLinear, tp_rank_and_size


class SparseMoE(nn.Module):
    """A mixture-of-experts MLP: the router picks ``top_k`` experts per token, an expert manager computes them.

    The model names the checkpoint's projections (``checkpoint_names``, e.g. {"w1": "gate", "w3": "up",
    "w2": "down"}); the chosen manager's ``install`` sets ``experts`` before the weights load.
    """

    def __init__(self, num_experts: int, top_k: int, hidden_size: int, intermediate_size: int,
                 normalize_topk: bool, checkpoint_names: dict[str, str]):
        super().__init__()
        self.num_experts = num_experts
        self.top_k = top_k
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.normalize_topk = normalize_topk
        self.checkpoint_names = checkpoint_names
        self.tp_size = tp_rank_and_size()[1]
        self.gate = ReplicatedLinear(hidden_size, num_experts)
        self.experts = None  # an ExpertManager

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k experts per token and their weights: softmax over all experts, then optionally renormalised."""
        logits = self.gate(x)
        if logits.is_cuda:  # the same in one kernel
            from nanovllm.kernels.routing import top_k_routing
            return top_k_routing(logits, self.top_k, self.normalize_topk)
        weights, ids = logits.float().softmax(dim=-1).topk(self.top_k, dim=-1)
        if self.normalize_topk:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights, ids

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, ids = self.route(x)
        out = self.experts(x, weights, ids)
        if self.tp_size > 1:
            dist.all_reduce(out)
        return out


def grouped_experts(x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor, expert_weights,
                    out: torch.Tensor | None = None, only: set[int] | None = None) -> torch.Tensor:
    """``run_experts`` for SwiGLU experts given by their weights: ``expert_weights(e)`` gives expert e's
    (w13 [2I, H], w2 [H, I])."""
    def expert_output(expert, rows):
        w13, w2 = expert_weights(expert)
        return silu_and_mul(rows @ w13.t()) @ w2.t()
    return run_experts(x, topk_weights, topk_ids, expert_output, out, only)


def run_experts(x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor, expert_output,
                out: torch.Tensor | None = None, only: set[int] | None = None) -> torch.Tensor:
    """Sort the (token, expert) pairs by expert and run each expert once over its tokens, adding the weighted
    outputs into ``out``: ``expert_output(e, rows)`` maps expert e's input rows [n, H] to [n, H]; ``only`` limits
    which experts run."""
    top_k = topk_ids.size(1)
    flat_ids = topk_ids.flatten()
    order = flat_ids.argsort(stable=True)
    counts = torch.bincount(flat_ids, minlength=1).tolist()
    weights = topk_weights.flatten()[order].to(x.dtype).unsqueeze(1)
    out = torch.zeros_like(x) if out is None else out
    start = 0
    for expert, count in enumerate(counts):
        if count and (only is None or expert in only):
            pairs = slice(start, start + count)
            tokens = order[pairs] // top_k
            out.index_add_(0, tokens, expert_output(expert, x[tokens]) * weights[pairs])
        start += count
    return out
