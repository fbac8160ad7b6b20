"""CUDA graphs for steps that carry prefill tokens: the model is captured in pieces between its attention calls,
and attention runs eagerly in the gaps with the step's own layout (its sequence lengths change every step, so it
cannot be part of a fixed-shape graph). A step pads its token count up to the nearest captured size."""
import torch

from nanovllm.engine.context import Context, get_context, set_context
from nanovllm.layers import attention


class _Pieces:
    """One padded token count: pieces[i] runs the model up to attention call i; the last piece runs to the end."""

    def __init__(self, pool):
        self.pieces: list[torch.cuda.CUDAGraph] = []
        self.attention_calls: list[tuple] = []  # (layer, q, k, v, out): static tensors read and written in the gaps
        self.hidden: torch.Tensor | None = None
        self.pool = pool  # the memory pool the pieces allocate from (None: a new one)

    def begin(self):
        self.pieces.append(torch.cuda.CUDAGraph())
        self.pieces[-1].capture_begin(pool=self.pool)

    def end(self):
        self.pieces[-1].capture_end()
        self.pool = self.pieces[-1].pool()

    def attention_between_pieces(self, layer, q, k, v) -> torch.Tensor:
        """Called by Attention.forward while capturing: close the piece, attend eagerly, open the next piece."""
        self.end()
        out = layer.backend.forward(q, k, v, layer.kv_cache, get_context())
        self.attention_calls.append((layer, q, k, v, out))
        self.begin()
        return out

    def replay(self, num_tokens: int, context: Context) -> torch.Tensor:
        for piece, (layer, q, k, v, out) in zip(self.pieces, self.attention_calls):
            piece.replay()
            out[:num_tokens] = layer.backend.forward(q[:num_tokens], k[:num_tokens], v[:num_tokens], layer.kv_cache,
                                                     context)
        self.pieces[-1].replay()
        return self.hidden[:num_tokens]


class PiecewiseGraphs:
    """Pieces captured for each of ``sizes`` (token counts), sharing ``pool`` with the decode graphs."""

    def __init__(self, model: torch.nn.Module, sizes: list[int], device: torch.device, pool=None):
        self.sizes = sorted(sizes)
        self.input_ids = torch.zeros(self.sizes[-1], dtype=torch.int64, device=device)
        self.positions = torch.zeros(self.sizes[-1], dtype=torch.int64, device=device)
        self.graphs: dict[int, _Pieces] = {}
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            for size in reversed(self.sizes):  # the largest first: the smaller ones reuse its pool's memory
                set_context(_one_fresh_prompt(size, device))
                try:
                    model(self.input_ids[:size], self.positions[:size])  # compile for this size outside the graph
                    graph = self.graphs[size] = _Pieces(pool)
                    attention.piecewise_capture = graph
                    graph.begin()
                    graph.hidden = model(self.input_ids[:size], self.positions[:size])
                    graph.end()
                    pool = graph.pool
                finally:
                    attention.piecewise_capture = None
                    set_context(None)
        torch.cuda.current_stream(device).wait_stream(stream)
        torch.cuda.synchronize(device)

    def size_for(self, num_tokens: int) -> int | None:
        """The smallest captured size that holds ``num_tokens``; None when none does."""
        return next((size for size in self.sizes if size >= num_tokens), None)

    def run(self, size: int, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """The model's hidden states of the step whose Context is set; the rows past its tokens are padding."""
        num_tokens = len(input_ids)
        self.input_ids[:num_tokens] = input_ids
        self.positions[:num_tokens] = positions
        return self.graphs[size].replay(num_tokens, get_context())


def _one_fresh_prompt(num_tokens: int, device: torch.device) -> Context:
    """A capture's layout: one new prompt of ``num_tokens`` that writes no KV (its values are never used)."""
    cu = torch.tensor([0, num_tokens], dtype=torch.int32, device=device)
    return Context(cu, cu, num_tokens, num_tokens, torch.full((num_tokens,), -1, dtype=torch.int64, device=device),
                   cu.diff(), torch.zeros(1, 0, dtype=torch.int32, device=device), False, is_fresh_prefill=True)
