"""Triton kernels for the sampler's common case (no top-k/top-p, no seeds): the Gumbel-max draw, or the argmax of a
greedy row, with each row's vocabulary split over many programs. Compiled PyTorch reduced a row in one program:
0.14-0.25 ms a step on an H100 at 23-256 rows of Qwen3's 151,936 logits (benchmarks/RESULTS.md)."""
import torch
import triton
import triton.language as tl

QUARTER = 1024  # a program's chunk is four of these: one Philox draw gives four uniforms


@triton.jit
def _best_of_quarter(row_ptr, start, vocab, offs, temperature, uniform, SAMPLE: tl.constexpr):
    """The largest score among the vocabulary's ids start + offs, and its id (the smallest id among equals)."""
    ids = start + offs
    scores = tl.load(row_ptr + ids, mask=ids < vocab, other=float("-inf")).to(tl.float32)
    if SAMPLE:  # argmax(logits / T + Gumbel noise) draws from softmax(logits / T)
        scores = scores / temperature - tl.log(-tl.log(uniform))
    value, index = tl.max(scores, 0, return_indices=True)
    return value, start + index


@triton.jit
def _better(best, best_id, value, index):
    """The larger of two (score, id) pairs; the first on a tie (its id is the smaller)."""
    return tl.maximum(value, best), tl.where(value > best, index, best_id)


@triton.jit
def _best_of_chunk(row_ptr, first, vocab, offs, temperature, u0, u1, u2, u3, QUARTER: tl.constexpr,
                   SAMPLE: tl.constexpr):
    best, best_id = _best_of_quarter(row_ptr, first, vocab, offs, temperature, u0, SAMPLE)
    value, index = _best_of_quarter(row_ptr, first + QUARTER, vocab, offs, temperature, u1, SAMPLE)
    best, best_id = _better(best, best_id, value, index)
    value, index = _best_of_quarter(row_ptr, first + 2 * QUARTER, vocab, offs, temperature, u2, SAMPLE)
    best, best_id = _better(best, best_id, value, index)
    value, index = _best_of_quarter(row_ptr, first + 3 * QUARTER, vocab, offs, temperature, u3, SAMPLE)
    return _better(best, best_id, value, index)


@triton.jit(do_not_specialize=["seed"])
def _chunk_best_kernel(logits_ptr, row_stride, temperatures_ptr, values_ptr, ids_ptr, seed, vocab,
                       QUARTER: tl.constexpr):
    """For one (row, chunk of the vocabulary): the chunk's best score and its id, into [rows, chunks] buffers."""
    row = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    num_chunks = tl.num_programs(1)
    first = chunk * 4 * QUARTER
    offs = tl.arange(0, QUARTER)
    row_ptr = logits_ptr + row * row_stride
    temperature = tl.load(temperatures_ptr + row)
    if temperature == 0:  # greedy: no noise (offs stands in for the unread uniforms)
        best, best_id = _best_of_chunk(row_ptr, first, vocab, offs, temperature, offs, offs, offs, offs, QUARTER,
                                       False)
    else:
        u0, u1, u2, u3 = tl.rand4x(seed, row * vocab + first + offs)  # one counter per (row, id): rows independent
        best, best_id = _best_of_chunk(row_ptr, first, vocab, offs, tl.maximum(temperature, 1e-5), u0, u1, u2, u3,
                                       QUARTER, True)
    tl.store(values_ptr + row * num_chunks + chunk, best)
    tl.store(ids_ptr + row * num_chunks + chunk, best_id)


@triton.jit
def _pick_kernel(values_ptr, ids_ptr, out_ptr, num_chunks, BLOCK_C: tl.constexpr):
    """Each row's best chunk (the first among equals): its id is the row's token."""
    row = tl.program_id(0).to(tl.int64)
    chunks = tl.arange(0, BLOCK_C)
    values = tl.load(values_ptr + row * num_chunks + chunks, mask=chunks < num_chunks, other=float("-inf"))
    best = tl.argmax(values, 0, tie_break_left=True)
    tl.store(out_ptr + row, tl.load(ids_ptr + row * num_chunks + best).to(tl.int64))


def gumbel_argmax(logits: torch.Tensor, temperatures: torch.Tensor) -> torch.Tensor:
    """One token id per row of ``logits`` [rows, vocab] (any float dtype, unit stride along the vocabulary): the
    argmax where the row's temperature is 0, else a draw from softmax(logits / temperature). The noise comes from
    a seed drawn from torch's CPU generator, so ``torch.manual_seed`` makes it repeat."""
    rows, vocab = logits.shape
    assert logits.stride(1) == 1 and temperatures.shape == (rows,)
    num_chunks = triton.cdiv(vocab, 4 * QUARTER)
    values = torch.empty(rows, num_chunks, dtype=torch.float32, device=logits.device)
    ids = torch.empty(rows, num_chunks, dtype=torch.int32, device=logits.device)
    out = torch.empty(rows, dtype=torch.int64, device=logits.device)
    if not rows:
        return out
    seed = int(torch.randint(2**31 - 1, ()))  # a fixed int32 type: Triton compiles the kernel once
    _chunk_best_kernel[(rows, num_chunks)](logits, logits.stride(0), temperatures, values, ids, seed, vocab,
                                           QUARTER=QUARTER)
    _pick_kernel[(rows,)](values, ids, out, num_chunks, BLOCK_C=triton.next_power_of_2(num_chunks))
    return out
