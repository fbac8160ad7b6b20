"""Expert managers: how a MoE layer's expert weights are stored and computed. Core's built-ins are
registered through the same hook as plugins' (``register_expert_managers``)."""
import torch
from torch import nn

import nanovllm
from nanovllm.layers.activation import silu_and_mul
from nanovllm.layers.linear import narrow_checked, tp_rank_and_size

PROJECTIONS = ("gate", "up", "down")


class ExpertManager(nn.Module):
    """Owns one MoE layer's experts. Subclasses set ``name`` and implement ``load_expert`` and ``forward``.

    Experts are SwiGLU MLPs: ``down(silu(gate(x)) * up(x))``; with tensor parallelism each rank holds a
    slice of every expert's intermediate dimension and the layer sums the ranks' outputs.
    """

    name: str = ""
    cuda_graphs: bool = False  # whether forward may be captured in a CUDA graph (no host syncs)

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int, checkpoint_names: dict[str, str],
                 config):
        super().__init__()
        self.tp_rank, self.tp_size = tp_rank_and_size()
        if intermediate_size % self.tp_size:
            raise ValueError(f"expert intermediate size {intermediate_size} is not divisible by "
                             f"tensor_parallel_size={self.tp_size}")
        self.num_experts = num_experts
        self.hidden_size = hidden_size
        self.full_intermediate_size = intermediate_size
        self.intermediate_size = intermediate_size // self.tp_size
        self.checkpoint_names = checkpoint_names  # the checkpoint's projection names -> gate/up/down
        self.loaded: set[tuple[int, str]] = set()

    @classmethod
    def claims(cls, config) -> bool:
        """True to be used for this checkpoint when the user names no manager (e.g. a format it recognises)."""
        return False

    def shard(self, projection: str, tensor: torch.Tensor) -> torch.Tensor:
        """This rank's slice of one expert's checkpoint tensor ([out, in] as Hugging Face stores it)."""
        size = self.intermediate_size
        if projection == "down":
            if tensor.shape[0] != self.hidden_size:
                raise ValueError(f"checkpoint shape {tuple(tensor.shape)} does not match the model's "
                                 f"({self.hidden_size}, {self.full_intermediate_size})")
            return narrow_checked(tensor, 1, self.tp_rank * size, size, self.full_intermediate_size)
        if tensor.shape[1] != self.hidden_size:
            raise ValueError(f"checkpoint shape {tuple(tensor.shape)} does not match the model's "
                             f"({self.full_intermediate_size}, {self.hidden_size})")
        return narrow_checked(tensor, 0, self.tp_rank * size, size, self.full_intermediate_size)

    def load_checkpoint_tensor(self, name: str, tensor: torch.Tensor):
        """Load ``{expert}.{projection}.weight`` (the name below this layer's ``experts`` module)."""
        expert, projection, _ = name.split(".", 2)
        if projection not in self.checkpoint_names or not expert.isdigit() or int(expert) >= self.num_experts:
            raise ValueError(f"no expert weight is named {name!r}")
        projection = self.checkpoint_names[projection]
        self.load_expert(int(expert), projection, self.shard(projection, tensor))
        self.loaded.add((int(expert), projection))

    def missing_checkpoint_tensors(self) -> list[str]:
        names = {projection: name for name, projection in self.checkpoint_names.items()}
        return [f"{e}.{names[p]}.weight" for e in range(self.num_experts) for p in PROJECTIONS
                if (e, p) not in self.loaded]

    def load_expert(self, expert: int, projection: str, tensor: torch.Tensor):
        raise NotImplementedError

    def forward(self, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
        """x: [tokens, hidden]; topk_weights, topk_ids: [tokens, top_k]. Returns this rank's share of the
        weighted sum of each token's experts, [tokens, hidden]."""
        raise NotImplementedError


class ResidentExperts(ExpertManager):
    """All experts on the device: gate and up stacked as w13 [E, 2I, H], down as w2 [E, H, I]."""

    name = "resident"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.w13 = nn.Parameter(torch.empty(self.num_experts, 2 * self.intermediate_size, self.hidden_size),
                                requires_grad=False)
        self.w2 = nn.Parameter(torch.empty(self.num_experts, self.hidden_size, self.intermediate_size),
                               requires_grad=False)

    def load_expert(self, expert, projection, tensor):
        size = self.intermediate_size
        target = {"gate": self.w13[expert, :size], "up": self.w13[expert, size:], "down": self.w2[expert]}[projection]
        target.copy_(tensor)

    def forward(self, x, topk_weights, topk_ids):
        return grouped_experts(x, topk_weights, topk_ids, lambda e: (self.w13[e], self.w2[e]))


def grouped_experts(x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor, expert_weights) -> torch.Tensor:
    """Sort the (token, expert) pairs by expert and run each expert once over its tokens.

    ``expert_weights(e)`` gives expert e's (w13 [2I, H], w2 [H, I]).
    """
    top_k = topk_ids.size(1)
    flat_ids = topk_ids.flatten()
    order = flat_ids.argsort(stable=True)
    counts = torch.bincount(flat_ids, minlength=1).tolist()
    weights = topk_weights.flatten()[order].to(x.dtype).unsqueeze(1)
    out = torch.zeros_like(x)
    start = 0
    for expert, count in enumerate(counts):
        if count:
            pairs = slice(start, start + count)
            tokens = order[pairs] // top_k
            w13, w2 = expert_weights(expert)
            y = silu_and_mul(x[tokens] @ w13.t()) @ w2.t()
            out.index_add_(0, tokens, y * weights[pairs])
            start += count
    return out


@nanovllm.hookimpl
def register_expert_managers(register):
    register(ResidentExperts)


def select_expert_manager(config) -> type[ExpertManager]:
    """The manager named by ``expert_manager=``, else the first that claims the checkpoint, else resident."""
    from nanovllm import plugins
    managers = plugins.expert_managers()
    if config.expert_manager is not None:
        if config.expert_manager not in managers:
            raise ValueError(f"expert_manager={config.expert_manager!r} is not installed; installed: "
                             f"{', '.join(sorted(managers))}")
        return managers[config.expert_manager]
    return next((cls for cls in managers.values() if cls.claims(config)), managers["resident"])
