import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from nanovllm.layers.linear import copy_checked, tp_rank_and_size


class VocabParallelEmbedding(nn.Module):
    """Embedding table split by vocabulary rows; each rank looks up its rows, then all-reduce."""

    def __init__(self, num_embeddings: int, embedding_dim: int):
        super().__init__()
        self.tp_rank, self.tp_size = tp_rank_and_size()
        self.num_embeddings = num_embeddings
        self.shard_size = -(-num_embeddings // self.tp_size)
        self.vocab_start = self.shard_size * self.tp_rank
        self.weight = nn.Parameter(torch.empty(self.shard_size, embedding_dim))
        self.weight.weight_loader = self.weight_loader

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor):
        shard = loaded[self.vocab_start:self.vocab_start + self.shard_size]
        param.data.zero_()  # rows past the vocabulary (last rank's padding) stay zero
        if loaded.shape[1:] != param.shape[1:] or loaded.shape[0] != self.num_embeddings:
            raise ValueError(f"checkpoint shape {tuple(loaded.shape)} does not match the model's "
                             f"({self.num_embeddings}, {param.shape[1]})")
        copy_checked(param.data[:shard.shape[0]], shard)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1:
            return F.embedding(x, self.weight)
        local = x - self.vocab_start
        mask = (local >= 0) & (local < self.shard_size)
        y = F.embedding(local.clamp(0, self.shard_size - 1), self.weight) * mask.unsqueeze(-1)
        dist.all_reduce(y)
        return y


class ParallelLMHead(VocabParallelEmbedding):
    """Logits from the last hidden states; rank 0 gathers the vocabulary shards."""

    def forward(self, x: torch.Tensor) -> torch.Tensor | None:
        logits = F.linear(x, self.weight)
        if self.tp_size > 1:
            shards = [torch.empty_like(logits) for _ in range(self.tp_size)] if self.tp_rank == 0 else None
            dist.gather(logits, shards, 0)
            logits = torch.cat(shards, -1) if self.tp_rank == 0 else None
        return None if logits is None else logits[..., :self.num_embeddings]
