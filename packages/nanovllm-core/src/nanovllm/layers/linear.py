"""Linear layers split across tensor-parallel ranks. Each parameter carries its weight_loader."""
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


def tp_rank_and_size() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def copy_checked(param_slice: torch.Tensor, loaded: torch.Tensor):
    if param_slice.shape != loaded.shape:
        raise ValueError(f"checkpoint shape {tuple(loaded.shape)} does not match the model's {tuple(param_slice.shape)}")
    param_slice.copy_(loaded)


def narrow_checked(loaded: torch.Tensor, dim: int, start: int, size: int, full_size: int) -> torch.Tensor:
    """This rank's slice of a checkpoint tensor whose ``dim`` must hold ``full_size`` entries."""
    if loaded.size(dim) != full_size:
        raise ValueError(f"checkpoint shape {tuple(loaded.shape)} does not match the model's size {full_size} "
                         f"along dimension {dim}")
    return loaded.narrow(dim, start, size)


def _divide(numerator: int, denominator: int) -> int:
    if numerator % denominator:
        raise ValueError(f"{numerator} is not divisible by tensor_parallel_size={denominator}")
    return numerator // denominator


class LinearBase(nn.Module):
    """y = x W^T + b with W of shape [output_size, input_size], split along ``tp_dim`` (None: whole)."""

    def __init__(self, input_size: int, output_size: int, bias: bool, tp_dim: int | None):
        super().__init__()
        self.tp_rank, self.tp_size = tp_rank_and_size()
        self.tp_dim = tp_dim
        self.weight = nn.Parameter(torch.empty(output_size, input_size))
        self.weight.weight_loader = self.weight_loader
        if bias:
            self.bias = nn.Parameter(torch.empty(output_size))
            self.bias.weight_loader = self.weight_loader
        else:
            self.register_parameter("bias", None)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor):
        if self.tp_dim is not None and self.tp_dim < loaded.dim():
            shard = param.size(self.tp_dim)
            loaded = narrow_checked(loaded, self.tp_dim, self.tp_rank * shard, shard, shard * self.tp_size)
        copy_checked(param.data, loaded)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class ReplicatedLinear(LinearBase):
    def __init__(self, input_size: int, output_size: int, bias: bool = False):
        super().__init__(input_size, output_size, bias, None)


class ColumnParallelLinear(LinearBase):
    """Output features split across ranks; the output stays split."""

    def __init__(self, input_size: int, output_size: int, bias: bool = False):
        _, tp_size = tp_rank_and_size()
        super().__init__(input_size, _divide(output_size, tp_size), bias, 0)


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel projections of the same input in one matmul (e.g. gate and up)."""

    def __init__(self, input_size: int, output_sizes: list[int], bias: bool = False):
        self.output_sizes = output_sizes
        super().__init__(input_size, sum(output_sizes), bias)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: int):
        offset = sum(self.output_sizes[:shard_id]) // self.tp_size
        size = self.output_sizes[shard_id] // self.tp_size
        loaded = narrow_checked(loaded, 0, self.tp_rank * size, size, self.output_sizes[shard_id])
        copy_checked(param.data.narrow(0, offset, size), loaded)


class QKVParallelLinear(ColumnParallelLinear):
    """Q, K and V projections in one matmul; heads split across ranks (KV heads replicated if fewer)."""

    def __init__(self, hidden_size: int, head_dim: int, num_heads: int, num_kv_heads: int, bias: bool = False):
        _, tp_size = tp_rank_and_size()
        self.head_dim = head_dim
        self.total_num_kv_heads = num_kv_heads
        self.num_heads = _divide(num_heads, tp_size)
        self.num_kv_heads = max(1, num_kv_heads // tp_size)
        self.num_kv_head_replicas = max(1, tp_size // num_kv_heads)
        if num_kv_heads % tp_size and tp_size % num_kv_heads:
            raise ValueError(f"{num_kv_heads} KV heads cannot be split over tensor_parallel_size={tp_size}")
        output_size = (self.num_heads + 2 * self.num_kv_heads) * head_dim * tp_size
        super().__init__(hidden_size, output_size, bias)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: str):
        q_size = self.num_heads * self.head_dim
        kv_size = self.num_kv_heads * self.head_dim
        if shard_id == "q":
            offset, size, rank, full = 0, q_size, self.tp_rank, q_size * self.tp_size
        else:
            offset = q_size if shard_id == "k" else q_size + kv_size
            size, rank = kv_size, self.tp_rank // self.num_kv_head_replicas
            full = self.total_num_kv_heads * self.head_dim
        loaded = narrow_checked(loaded, 0, rank * size, size, full)
        copy_checked(param.data.narrow(0, offset, size), loaded)


class RowParallelLinear(LinearBase):
    """Input features split across ranks; partial outputs are summed with an all-reduce."""

    def __init__(self, input_size: int, output_size: int, bias: bool = False):
        _, tp_size = tp_rank_and_size()
        super().__init__(_divide(input_size, tp_size), output_size, bias, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The bias is added once, after the reduction.
        y = F.linear(x, self.weight)
        if self.tp_size > 1:
            dist.all_reduce(y)
        return y if self.bias is None else y + self.bias
