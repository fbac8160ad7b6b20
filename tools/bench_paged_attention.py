"""Attention alone: core's Triton paged-attention kernel against flash-attn 2's, for decode and for steps with a
prompt chunk.

    python tools/bench_paged_attention.py [--baseline FILE]... [--fa3 SO_FILE]

For a few decode shapes (fp16, head size 128, page 256, blocks shuffled; every sequence at the same length, or
one long sequence among short ones, as when a long prompt decodes beside chat requests):
the kernel with its default key splits, without splits and with 16 (the most key_splits gives: does one long
sequence among short ones want more than the default?), flash_attn_with_kvcache on the same cache
and, with --baseline, the ``paged_attention`` of other files (e.g. older versions or variants, to compare in one
run; named by the file's stem).
Times from triton.testing.do_bench of each call captured in a CUDA graph, as decode steps run it (timed eagerly,
small shapes measure Python's kernel launches); each output's largest difference from flash-attn 2's is printed
beside it. Then steps with prompt tokens (bf16): chunks ending a long prompt beside decodes, short prompts beside
decodes, and prompts alone. The kernel as a CUDA graph of such a step runs it (and padded as the step's graph
lays it out), against flash_attn_varlen_func over the paged cache as eager steps run it.

--fa3 adds flash-attn 3 (Hopper) beside them, in a CUDA graph too: its forward op from a compiled library, such as
the one vLLM's wheel for this torch ships (vllm 0.20.0 for torch 2.11: ``vllm/vllm_flash_attn/_vllm_fa3_C.abi3.so``),
loaded with torch.ops.load_library; its own split and GQA-packing heuristics.
"""
import argparse
import importlib.util
import pathlib

import torch
from triton.testing import do_bench

from nanovllm.engine.cuda_graphs import MIXED_SIZES
from nanovllm.kernels.prompt_work import prompt_work

# (query heads, KV heads, sequences, tokens of the first sequence, tokens of each other sequence)
SHAPES = [(16, 8, 1, 4096, 4096), (16, 8, 4, 4096, 4096), (16, 8, 16, 2048, 2048), (32, 8, 1, 8192, 8192),
          (16, 8, 128, 1024, 1024), (16, 8, 16, 7000, 256), (16, 8, 64, 7000, 256)]
HEAD_DIM, PAGE = 128, 256


def load_paged_attention(path: str):
    spec = importlib.util.spec_from_file_location("baseline_paged_attention", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.paged_attention


def in_graph(run):
    """``run`` captured in a CUDA graph (after a warm-up call): its replay."""
    run()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run()
    return graph.replay


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline", action="append", default=[], metavar="FILE",
                        help="a file whose paged_attention(q, kv_cache, cu_seqlens_q, ...) to time too (repeatable)")
    parser.add_argument("--fa3", metavar="SO_FILE", help="a flash-attn 3 library whose forward op to time too")
    args = parser.parse_args()
    from flash_attn import flash_attn_varlen_func, flash_attn_with_kvcache
    fa3 = load_fa3(args.fa3) if args.fa3 else None

    from nanovllm.kernels.paged_attention import key_splits, paged_attention
    baselines = {pathlib.Path(path).stem: load_paged_attention(path) for path in args.baseline}
    torch.manual_seed(0)
    print(torch.cuda.get_device_name())
    for heads, kv_heads, seqs, first_tokens, tokens in SHAPES:
        blocks_per_seq = -(-max(first_tokens, tokens) // PAGE)
        cache = torch.randn(2, seqs * blocks_per_seq, PAGE, kv_heads, HEAD_DIM, device="cuda", dtype=torch.float16)
        tables = torch.randperm(seqs * blocks_per_seq, device="cuda").view(seqs, blocks_per_seq).int()
        q = torch.randn(seqs, heads, HEAD_DIM, device="cuda", dtype=torch.float16)
        cu_seqlens_q = torch.arange(seqs + 1, device="cuda", dtype=torch.int32)
        lens = torch.full((seqs,), tokens, device="cuda", dtype=torch.int32)
        lens[0] = first_tokens
        scale = HEAD_DIM ** -0.5
        runs = {
            "ours": lambda: paged_attention(q, cache, cu_seqlens_q, lens, tables, 1, scale),
            "ours, no splits": lambda: paged_attention(q, cache, cu_seqlens_q, lens, tables, 1, scale, 1),
            "ours, 16 splits": lambda: paged_attention(q, cache, cu_seqlens_q, lens, tables, 1, scale, 16),
            "flash-attn 2": lambda: flash_attn_with_kvcache(q.unsqueeze(1), cache[0], cache[1], cache_seqlens=lens,
                                                           block_table=tables, causal=True).squeeze(1)}
        for stem, baseline in baselines.items():
            runs[stem] = lambda baseline=baseline: baseline(q, cache, cu_seqlens_q, lens, tables, 1, scale)
        if fa3:
            runs["flash-attn 3"] = lambda: fa3(q, cache, cu_seqlens_q, lens, tables, 1, max(first_tokens, tokens),
                                                 scale)
        reference = runs["flash-attn 2"]().float()
        kv_bytes = 2 * (first_tokens + (seqs - 1) * tokens) * kv_heads * HEAD_DIM * 2
        lengths = f"{seqs} x {tokens}" if first_tokens == tokens else f"1 x {first_tokens} + {seqs - 1} x {tokens}"
        line = f"{heads}/{kv_heads} heads, {lengths} tokens ({key_splits(seqs, kv_heads, q.device)} splits):"
        for name, run in runs.items():
            error = (run().float() - reference).abs().max().item()
            ms = do_bench(in_graph(run))
            line += f"  {name} {ms * 1e3:.0f} us {kv_bytes / ms / 1e6:.0f} GB/s (diff {error:.3f})"
        print(line, flush=True)
    print("Steps with prompt tokens (bf16), as a CUDA graph of the step replays them, against flash-attn 2's varlen "
          "kernel run eagerly")
    for name, step in PROMPT_STEPS.items():
        prompt_step(name, *step, paged_attention, flash_attn_varlen_func, baselines, fa3)


def load_fa3(path: str):
    """flash-attn 3's paged forward from vLLM's library at ``path``, called with core's paged_attention's tensors."""
    torch.ops.load_library(path)
    forward = torch.ops._vllm_fa3_C.fwd  # its schema: strings -n 20 SO_FILE | grep "^fwd("

    def fa3(q, kv_cache, cu_seqlens_q, context_lens, block_tables, max_seqlen_q, max_seqlen_k, scale):
        return forward(q, kv_cache[0], kv_cache[1], None, None, None, None, cu_seqlens_q, None, None, None,
                       context_lens, max_seqlen_q, max_seqlen_k, block_tables, None, None, None, None, None, None,
                       None, None, scale, True, -1, -1, 0.0, True, None, 0, None, 0, None, 1, 0, None)[0]
    return fa3


def _chunk_of_long_prompt(chunk: int, heads: int = 16) -> tuple:
    return heads, 8, [chunk] + [1] * 16, [7000] + [256] * 16


# name: (query heads, KV heads, query tokens of each sequence, keys of each sequence)
PROMPT_STEPS = {
    **{f"chunk {chunk:,} ending a 7,000-token prompt + 16 decodes over 256 (16/8 heads)": _chunk_of_long_prompt(chunk)
       for chunk in (64, 128, 256, 1024, 2048)},
    "chunk 128 ending a 7,000-token prompt + 16 decodes over 256 (32/8 heads)": _chunk_of_long_prompt(128, 32),
    "chunk 2,032 ending a 7,000-token prompt + 16 decodes over 256 (32/8 heads)": _chunk_of_long_prompt(2032, 32),
    "a 1,024-token prompt + 64 decodes over 600 (16/8 heads)": (16, 8, [1024] + [1] * 64, [1024] + [600] * 64),
    "chunk 412 ending a 900-token prompt + 100 decodes over 700 (16/8 heads)": (
        16, 8, [412] + [1] * 100, [900] + [700] * 100),
    "4 prompts of 2,048 (16/8 heads)": (16, 8, [2048] * 4, [2048] * 4),
    "16 prompts of 512 (16/8 heads)": (16, 8, [512] * 16, [512] * 16),
}


def prompt_step(name: str, heads: int, kv_heads: int, q_lens: list[int], lens: list[int], paged_attention,
                flash_attn_varlen_func, baselines: dict, fa3=None):
    """One step with prompt tokens: the Triton kernel's time against flash-attn 2's (and the baselines')."""
    blocks_per_seq = -(-max(lens) // PAGE)
    cache = torch.randn(2, len(lens) * blocks_per_seq, PAGE, kv_heads, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
    tables = torch.randperm(len(lens) * blocks_per_seq, device="cuda").view(len(lens), blocks_per_seq).int()
    q = torch.randn(sum(q_lens), heads, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
    cu_q = torch.tensor([0] + q_lens, device="cuda").cumsum(0).int()
    cu_k = torch.tensor([0] + lens, device="cuda").cumsum(0).int()
    context_lens = cu_k.diff().int()
    scale = HEAD_DIM ** -0.5
    max_q, max_k = max(q_lens), max(lens)
    work = prompt_work(q_lens, lens, heads, kv_heads, q.device)  # as the engine plans it, on the host
    runs = {"ours": lambda: paged_attention(q, cache, cu_q, context_lens, tables, max_q, scale, work=work),
            "flash-attn 2": lambda: flash_attn_varlen_func(q, cache[0], cache[1], cu_q, cu_k, max_q, max_k,
                                                           softmax_scale=scale, causal=True, block_table=tables)}
    size = next((size for size in MIXED_SIZES if size >= len(q)), None)
    if size is not None:  # as the step's graph replays it: padding tokens, and empty sequences up to 512
        seqs = min(size, 512)
        q_padded = torch.cat([q, q.new_zeros(size - len(q), heads, HEAD_DIM)])
        cu_padded = torch.cat([cu_q, cu_q[-1:].repeat(seqs - len(lens))])
        lens_padded = torch.cat([context_lens, context_lens.new_zeros(seqs - len(lens))])
        tables_padded = torch.cat([tables, tables.new_zeros(seqs - len(lens), blocks_per_seq)])
        runs[f"ours padded to {size} tokens, {seqs} sequences"] = lambda: paged_attention(
            q_padded, cache, cu_padded, lens_padded, tables_padded, size, scale, work=work)[:len(q)]
        if fa3:  # and the longest key range a graph for max_model_len=8192 would be captured with
            runs["flash-attn 3 padded alike, up to 8,192 keys"] = lambda: fa3(
                q_padded, cache, cu_padded, lens_padded, tables_padded, size, 8192, scale)[:len(q)]
    for stem, baseline in baselines.items():
        runs[stem] = lambda baseline=baseline: baseline(q, cache, cu_q, context_lens, tables, max_q, scale)
    if fa3:
        runs["flash-attn 3"] = lambda: fa3(q, cache, cu_q, context_lens, tables, max_q, max_k, scale)
    reference = runs["flash-attn 2"]().float()
    flops = 4 * heads * HEAD_DIM * sum(n * (k - n / 2) for n, k in zip(q_lens, lens))
    line = f"  {name}:"
    for kernel, run in runs.items():
        error = (run().float() - reference).abs().max().item()
        ms = do_bench(run if kernel == "flash-attn 2" else in_graph(run))
        line += f"  {kernel} {ms * 1e3:.0f} us {flops / ms / 1e9:.0f} TFLOP/s (diff {error:.3f})"
    print(line, flush=True)


if __name__ == "__main__":
    main()
