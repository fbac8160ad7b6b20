"""The per-step batch layout that attention layers read: one object, set by the model runner."""
from dataclasses import dataclass

import torch

from nanovllm.engine.kv_compaction import KVCompaction
from nanovllm.kernels.prompt_work import PromptWork


@dataclass
class Context:
    """Every sequence in a step is a run of query tokens over its paged KV cache.

    Sequence i computes its KV slots [context_lens[i] - q_len_i, context_lens[i]); decodes have q_len 1.
    Slots are positions less the tokens a KV-retention policy dropped, so a backend attends over slots only.
    """

    cu_seqlens_q: torch.Tensor  # int32 [num_seqs + 1]
    cu_seqlens_k: torch.Tensor  # int32 [num_seqs + 1]
    max_seqlen_q: int
    max_seqlen_k: int
    slot_mapping: torch.Tensor  # int64 [num_tokens]: where each new token's K and V go in the cache
    context_lens: torch.Tensor  # int32 [num_seqs]: KV slots in use after this step
    block_tables: torch.Tensor  # int32 [num_seqs, max_blocks]: cache block ids, padded with 0
    is_decode: bool  # every sequence has exactly one query token
    is_fresh_prefill: bool = False  # every sequence starts at position 0: its keys are this step's tokens
    compaction: KVCompaction | None = None  # prompts completing in this step whose KV a retention policy thins
    # how core's paged-attention kernel deals a step's prompt tokens to its programs, planned on the host (CUDA
    # steps with prompt tokens over cached keys)
    prompt_work: PromptWork | None = None
    # replayed from a CUDA graph: attention must launch a grid fixed by the tensors' shapes (the lengths change
    # between replays). max_seqlen_q and max_seqlen_k are upper bounds, tokens and sequences past the step's are
    # padding (no slot; no keys), cu_seqlens_k is not the keys' offsets (context_lens is)
    captured: bool = False


_context: Context | None = None


def set_context(context: Context | None):
    global _context
    _context = context


def get_context() -> Context:
    return _context
