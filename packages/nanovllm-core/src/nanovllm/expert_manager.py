"""The expert-manager interface (how a MoE layer's expert weights are stored and computed) and the choice
of a manager. Core's own managers live in ``nanovllm/default_plugins/expert_managers.py``."""
import torch
from torch import nn

from nanovllm import plugins
from nanovllm.layers.linear import narrow_checked, tp_rank_and_size
from nanovllm.layers.moe import SparseMoE

PROJECTIONS = ("gate", "up", "down")


class ExpertManager(nn.Module):
    """Owns one MoE layer's experts. Subclasses set ``name`` and implement ``load_expert`` and ``forward``.

    Experts are SwiGLU MLPs: ``down(silu(gate(x)) * up(x))``; with tensor parallelism each rank holds a
    slice of every expert's intermediate dimension and the layer sums the ranks' outputs.
    """

    name: str = ""
    priority: int = 0  # the highest-priority manager that supports a checkpoint is used unless one is named
    cuda_graphs: bool = False  # whether forward may be captured in a CUDA graph (no host syncs)
    reads_checkpoint: bool = True  # False: the checkpoint's dense expert tensors are skipped unread

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
        self.config = config
        self.loaded: set[tuple[int, str]] = set()

    @classmethod
    def unsupported_reason(cls, config, by_name: bool = False) -> str | None:
        """Why this manager cannot serve ``config``'s checkpoint (or is only used when named), or None."""
        return None

    @classmethod
    def install(cls, model: nn.Module, config) -> list["ExpertManager"]:
        """Put a manager of this class into every MoE layer of ``model``; returns them in layer order.
        Override to wire layers together (``offload`` prefetches the next layer's experts)."""
        managers = []
        for moe in (m for m in model.modules() if isinstance(m, SparseMoE)):
            moe.experts = cls(moe.num_experts, moe.hidden_size, moe.intermediate_size, moe.checkpoint_names, config)
            managers.append(moe.experts)
        return managers

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


def select_expert_manager(config) -> tuple[type[ExpertManager], str]:
    """The manager named by ``expert_manager=``, else the highest-priority one that supports the checkpoint."""
    return plugins.choose(plugins.expert_managers(), lambda cls, by_name: cls.unsupported_reason(config, by_name),
                          config.expert_manager, "expert_manager", "expert manager", f"the checkpoint {config.model!r}")
