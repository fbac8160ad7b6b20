"""CUDA graphs of whole steps, attention included: decode steps by batch size, steps with prompt tokens by token
count. A step replays the smallest graph that holds it, with its layout copied into the graphs' static buffers;
the rows and sequences past its own are padding (no KV slot, no query tokens)."""
from collections.abc import Callable

import numpy as np
import torch

from nanovllm.engine.context import Context, set_context
from nanovllm.kernels.prompt_work import PromptWork, item_capacity, plan, programs_per_kv_head, with_counts

# Token counts of the captured steps with prompt tokens; larger steps run eagerly (their GPU time dwarfs the CPU's
# launching of their kernels).
MIXED_SIZES = (16, 32, 64, 128, 256, 512, 1024, 2048)
MAX_SEQS = 512  # sequences a graph holds at most; steps with more run eagerly


class CudaGraphs:
    def __init__(self, model: torch.nn.Module, max_num_seqs: int, max_num_batched_tokens: int, max_model_len: int,
                 block_size: int, hidden_size: int, num_heads: int, num_kv_heads: int, dtype: torch.dtype,
                 device: torch.device):
        self.model = model
        self.group = num_heads // num_kv_heads
        self.max_seqs = min(max_num_seqs, MAX_SEQS)
        self.decode_sizes = sorted({1, 2, 4, 8, *range(16, self.max_seqs + 1, 16), self.max_seqs})
        self.mixed_sizes = [size for size in MIXED_SIZES if size <= max_num_batched_tokens]
        self.max_model_len = max_model_len
        max_tokens = max([self.max_seqs, *self.mixed_sizes])
        max_blocks = -(-max_model_len // block_size)

        def zeros(*shape, dtype=torch.int64):
            return torch.zeros(*shape, dtype=dtype, device=device)
        self.input_ids, self.positions = zeros(max_tokens), zeros(max_tokens)
        self.slot_mapping = torch.full((max_tokens,), -1, dtype=torch.int64, device=device)
        self.cu_seqlens_q = zeros(self.max_seqs + 1, dtype=torch.int32)
        self.decode_cu_seqlens = torch.arange(self.max_seqs + 1, dtype=torch.int32, device=device)  # never changes
        self.context_lens = zeros(self.max_seqs, dtype=torch.int32)
        self.block_tables = zeros(self.max_seqs, max_blocks, dtype=torch.int32)
        self.hidden = zeros(max_tokens, hidden_size, dtype=dtype)
        self.programs = programs_per_kv_head(num_kv_heads, device)
        self.prompt_work = PromptWork(zeros(item_capacity(max_tokens, self.programs) + 1, 5, dtype=torch.int32),
                                      zeros(self.programs + 1, 4, dtype=torch.int32))
        self.decode: dict[int, torch.cuda.CUDAGraph] = {}
        self.mixed: dict[int, torch.cuda.CUDAGraph] = {}
        pool = None
        # one memory pool; each family largest first, so that its smaller graphs fit in what the largest took
        for graphs, sizes, decode in ((self.decode, self.decode_sizes, True), (self.mixed, self.mixed_sizes, False)):
            for size in reversed(sizes):
                graphs[size] = self._capture(size, decode, pool)
                pool = pool or graphs[size].pool()
        set_context(None)

    def _context(self, num_tokens: int, decode: bool) -> Context:
        num_seqs = num_tokens if decode else min(num_tokens, self.max_seqs)
        cu = (self.decode_cu_seqlens if decode else self.cu_seqlens_q)[:num_seqs + 1]
        return Context(cu, cu, 1 if decode else num_tokens, self.max_model_len, self.slot_mapping[:num_tokens],
                       self.context_lens[:num_seqs], self.block_tables[:num_seqs], decode, captured=True,
                       prompt_work=None if decode else self.prompt_work)

    def _capture(self, num_tokens: int, decode: bool, pool) -> torch.cuda.CUDAGraph:
        """A step of ``num_tokens`` with the buffers as they are: no query tokens in any sequence (the
        cumulative lengths are 0) or, for decode, no keys, and no KV slot, so running it writes nothing."""
        set_context(self._context(num_tokens, decode))
        ids, positions = self.input_ids[:num_tokens], self.positions[:num_tokens]
        self.hidden[:num_tokens] = self.model(ids, positions)  # warm-up (compilation) outside the graph
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool):
            self.hidden[:num_tokens] = self.model(ids, positions)
        graph.replay()  # a graph's first replay uploads it: here, not in the first steps that use it
        torch.cuda.synchronize()
        return graph

    def run(self, input_ids: torch.Tensor, positions: np.ndarray, cu_seqlens_q: np.ndarray,
            cu_seqlens_k: np.ndarray, slot_mapping: np.ndarray, block_tables: np.ndarray,
            staged: Callable[[str, np.ndarray], torch.Tensor]) -> torch.Tensor | None:
        """Replay the step (its token ids on the device, the rest as host arrays that ``staged`` puts in pinned
        memory); returns its hidden states, or None when no graph holds it."""
        num_tokens, num_seqs = len(positions), len(cu_seqlens_q) - 1
        decode = num_tokens == num_seqs
        sizes = self.decode_sizes if decode else self.mixed_sizes
        size = next((s for s in sizes if s >= num_tokens), None)
        if size is None or num_seqs > self.max_seqs:
            return None
        graph_seqs = size if decode else min(size, self.max_seqs)
        self.input_ids[:num_tokens].copy_(input_ids)
        self.positions[:num_tokens].copy_(staged("positions", positions), non_blocking=True)
        slots = np.full(size, -1, dtype=np.int64)
        slots[:num_tokens] = slot_mapping
        self.slot_mapping[:size].copy_(staged("slot_mapping", slots), non_blocking=True)
        context_lens = np.zeros(graph_seqs, dtype=np.int32)
        context_lens[:num_seqs] = np.diff(cu_seqlens_k)
        self.context_lens[:graph_seqs].copy_(staged("context_lens", context_lens), non_blocking=True)
        if not decode:  # the sequences past the step's are empty
            cu = np.full(graph_seqs + 1, num_tokens, dtype=np.int32)
            cu[:num_seqs + 1] = cu_seqlens_q
            self.cu_seqlens_q[:graph_seqs + 1].copy_(staged("cu_seqlens_q", cu), non_blocking=True)
            items, combines = plan(np.diff(cu_seqlens_q), context_lens[:num_seqs], self.group, self.programs)
            for name, rows, buffer in (("items", items, self.prompt_work.items),
                                       ("combines", combines, self.prompt_work.combines)):
                buffer[:len(rows) + 1].copy_(staged(name, with_counts(rows, len(rows))), non_blocking=True)
        self.block_tables[:num_seqs, :block_tables.shape[1]].copy_(staged("block_tables", block_tables),
                                                                  non_blocking=True)
        (self.decode if decode else self.mixed)[size].replay()
        return self.hidden[:num_tokens]
