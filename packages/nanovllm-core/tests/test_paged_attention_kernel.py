"""The Triton paged-attention kernel (the fa1 backend's, and the fa2 backend's for decode and captured steps)
against torch SDPA: under TRITON_INTERPRET=1 on CPU (CI) and compiled on a GPU, for prefill, prefix-cached and
chunked prefill, decode (keys whole or split) and mixed batches."""

import pytest
import torch
import torch.nn.functional as F

from nanovllm.kernels.prompt_work import KEY_TILE, prompt_work

CASES = {
    "prefill": [(0, 1), (0, 16), (0, 37)],
    "prefix-cached prefill": [(16, 5), (24, 20), (8, 1)],
    "decode": [(0, 1), (9, 1), (40, 1), (63, 1)],
    "mixed": [(30, 1), (0, 19), (16, 40), (50, 1)],
}

HEADS = [(4, 2), (4, 4), (8, 2), (6, 2), (32, 2)]  # (query heads, KV heads): groups of 2, 1, 4, 3 and 16


def reference(q, k, v, scale):
    """Causal SDPA of the last q.size(0) positions over all k.size(0) keys; GQA by repetition."""
    group = q.size(1) // k.size(1)
    offset = k.size(0) - q.size(0)
    mask = torch.arange(k.size(0))[None, :] <= torch.arange(q.size(0))[:, None] + offset
    out = F.scaled_dot_product_attention(q.transpose(0, 1).float(), k.repeat_interleave(group, 1).transpose(0, 1).float(),
                                         v.repeat_interleave(group, 1).transpose(0, 1).float(),
                                         attn_mask=mask.to(q.device), scale=scale)
    return out.transpose(0, 1)


def check(module, seqs, device, dtype, head_dim=16, num_heads=4, num_kv_heads=2, page=8, tol=2e-3, splits=None,
          padding=None, programs=None):
    """seqs: (cached tokens, new tokens) per sequence; K/V of all tokens already in a shuffled paged cache.
    ``padding`` (tokens, sequences, max_seqlen_q): laid out as a CUDA graph of a larger step replays it, with
    padding tokens after the real ones, empty sequences after the real ones and an upper bound for max_seqlen_q.
    ``programs``: prompt tokens planned for that many programs a KV head, in splits of one key tile or more."""
    torch.manual_seed(0)
    scale = head_dim ** -0.5
    max_blocks = max(-(-(c + n) // page) for c, n in seqs)
    num_blocks = len(seqs) * max_blocks + 2
    kv_cache = torch.randn(2, num_blocks, page, num_kv_heads, head_dim, device=device).to(dtype)
    tables = torch.randperm(num_blocks)[:len(seqs) * max_blocks].view(len(seqs), max_blocks).int().to(device)
    queries, expected = [], []
    for i, (cached, new) in enumerate(seqs):
        total = cached + new
        k = torch.randn(total, num_kv_heads, head_dim, device=device).to(dtype)
        v = torch.randn(total, num_kv_heads, head_dim, device=device).to(dtype)
        pos = torch.arange(total, device=device)
        slots = tables[i, pos // page].long() * page + pos % page
        kv_cache[0].view(-1, num_kv_heads, head_dim)[slots] = k
        kv_cache[1].view(-1, num_kv_heads, head_dim)[slots] = v
        q = torch.randn(new, num_heads, head_dim, device=device).to(dtype)
        queries.append(q)
        expected.append(reference(q, k, v, scale))
    cu_q = torch.tensor([0] + [n for _, n in seqs], device=device).cumsum(0).int()
    context_lens = torch.tensor([c + n for c, n in seqs], device=device, dtype=torch.int32)
    max_q = max(n for _, n in seqs)
    q = torch.cat(queries)
    if padding is not None:
        extra_tokens, extra_seqs, max_q = padding
        q = torch.cat([q, torch.randn(extra_tokens, num_heads, head_dim, device=device).to(dtype)])
        cu_q = torch.cat([cu_q, cu_q[-1:].repeat(extra_seqs)])
        context_lens = torch.cat([context_lens, context_lens.new_zeros(extra_seqs)])
        tables = torch.cat([tables, tables.new_zeros(extra_seqs, tables.size(1))])
    work = None
    if programs is not None:
        work = prompt_work(cu_q.diff().cpu().numpy(), context_lens.cpu().numpy(), num_heads, num_kv_heads,
                           q.device, programs, KEY_TILE)
        assert (work.combines[0, 0] > 0).item(), "no tile's keys were split"
    out = module.paged_attention(q, kv_cache, cu_q, context_lens, tables, max_q, scale, splits, work)
    out = out[:sum(n for _, n in seqs)]
    error = (out.float() - torch.cat(expected)).abs().max().item()
    assert error < tol, f"max error {error}"


def check_padding_rows(module, device, dtype, splits, head_dim=16, page=8):
    """A CUDA graph pads a decode batch with rows of context length 0: they come out as zeros, not NaN."""
    kv_cache = torch.randn(2, 4, page, 2, head_dim, device=device).to(dtype)
    q = torch.randn(3, 4, head_dim, device=device).to(dtype)
    cu_q = torch.arange(4, device=device, dtype=torch.int32)
    context_lens = torch.tensor([5, 0, 0], device=device, dtype=torch.int32)
    tables = torch.tensor([[1, 2], [0, 0], [0, 0]], device=device, dtype=torch.int32)
    out = module.paged_attention(q, kv_cache, cu_q, context_lens, tables, 1, head_dim ** -0.5, splits)
    assert out[0].isfinite().all() and (out[1:] == 0).all(), f"padding rows: {out[1:]}"


def check_interpreted():
    from nanovllm.kernels import paged_attention
    for case, seqs in CASES.items():
        for num_heads, num_kv_heads in HEADS:
            try:
                check(paged_attention, seqs, "cpu", torch.float32, num_heads=num_heads, num_kv_heads=num_kv_heads)
            except AssertionError as exc:
                raise AssertionError(f"{case}, {num_heads} heads over {num_kv_heads}: {exc}") from None
    check(paged_attention, CASES["mixed"], "cpu", torch.float32, head_dim=24, num_heads=6)  # 24: not a power of 2
    check(paged_attention, CASES["decode"], "cpu", torch.float32, head_dim=24, num_heads=6, splits=3)
    # decode with the keys split (a split reads MIN_SPLIT_KEYS or more: 16 is more splits than most sequences use)
    for splits in (2, 3, 16):
        try:
            check(paged_attention, CASES["decode"] + [(200, 1), (1700, 1)], "cpu", torch.float32, splits=splits)
        except AssertionError as exc:
            raise AssertionError(f"decode in {splits} splits: {exc}") from None
    # prompt tokens with the keys split: rows of a tile that see none of a split's keys weigh nothing; more
    # programs than items, and fewer
    for programs in (8, 16, 64):
        try:
            check(paged_attention, [(1000, 40), (500, 40), (0, 64), (30, 1)], "cpu", torch.float32,
                  programs=programs)
        except AssertionError as exc:
            raise AssertionError(f"prompt chunks planned for {programs} programs: {exc}") from None
    for splits in (1, 4):
        check_padding_rows(paged_attention, "cpu", torch.float32, splits)
    for page in (64, 128):  # pages that hold whole key tiles: one block id per tile
        try:
            check(paged_attention, [(1000, 40), (500, 40), (0, 64), (30, 1), (300, 1)], "cpu", torch.float32,
                  page=page, programs=8)
            check(paged_attention, CASES["decode"] + [(200, 1), (1700, 1)], "cpu", torch.float32, page=page)
        except AssertionError as exc:
            raise AssertionError(f"pages of {page}: {exc}") from None
    tile_config = paged_attention.tile_config
    for block_n in (16, 32):  # the key tiles of a Turing GPU, within a page and across pages
        paged_attention.tile_config = lambda *args, block_n=block_n: dict(BLOCK_N=block_n)
        try:
            for page in (8, 16, 64):
                check(paged_attention, [(1000, 40), (500, 40), (0, 64), (30, 1)], "cpu", torch.float32, page=page,
                      programs=8)
                check(paged_attention, CASES["decode"] + [(700, 1)], "cpu", torch.float32, page=page, splits=3)
        except AssertionError as exc:
            raise AssertionError(f"key tiles of {block_n}: {exc}") from None
        finally:
            paged_attention.tile_config = tile_config
    for case in ("mixed", "prefix-cached prefill", "decode"):  # as a captured step of 128 tokens and 9 sequences
        seqs = CASES[case]
        check(paged_attention, seqs, "cpu", torch.float32, num_heads=8, num_kv_heads=2,
              padding=(128 - sum(n for _, n in seqs), 9 - len(seqs), 128))
    real = paged_attention.paged_attention  # and the check fails when the kernel reads the wrong blocks

    def shifted_tables(q, kv_cache, cu_q, context_lens, tables, max_q, scale, splits, work):
        return real(q, kv_cache, cu_q, context_lens, tables.roll(1, dims=1), max_q, scale, splits, work)
    paged_attention.paged_attention = shifted_tables
    with pytest.raises(AssertionError, match="max error"):
        check(paged_attention, CASES["prefix-cached prefill"], "cpu", torch.float32)
    with pytest.raises(AssertionError, match="max error"):
        check(paged_attention, [(200, 5), (100, 20)], "cpu", torch.float32, page=64)


def test_paged_attention_interpreted_on_cpu():
    """Every case in one interpreter process (each costs a Python start-up with torch)."""
    from nanovllm.testing import run_interpreted
    run_interpreted(__file__, "check_interpreted")


@pytest.mark.gpu
@pytest.mark.parametrize("splits", [None, 3, 8])
def test_paged_attention_splits_on_gpu_fp16(splits):
    """Decode with the keys split: by default a batch this small gets splits."""
    from nanovllm.kernels import paged_attention
    assert paged_attention.key_splits(5, 2, torch.device("cuda")) > 1
    check(paged_attention, CASES["decode"] + [(700, 1)], "cuda", torch.float16, head_dim=128, num_heads=8,
          page=16, tol=2e-2, splits=splits)
    # pages holding whole key tiles, 20 of them: block ids are read 16 pages at a time
    check(paged_attention, CASES["decode"] + [(5000, 1)], "cuda", torch.float16, head_dim=128, num_heads=8,
          page=256, tol=2e-2, splits=splits)
    check_padding_rows(paged_attention, "cuda", torch.float16, splits)


@pytest.mark.gpu
@pytest.mark.parametrize("programs", [None, 16, 300])
def test_paged_attention_prompt_splits_on_gpu(programs):
    """A chunk ending a long prompt beside decodes, its keys split as planned: by default (in paged_attention), and
    for fewer and more programs than the step has items, in splits of one key tile or more."""
    from nanovllm.kernels import paged_attention
    check(paged_attention, [(6900, 100), (255, 1), (20, 1), (3000, 30)], "cuda", torch.bfloat16, head_dim=128,
          num_heads=16, num_kv_heads=8, page=256, tol=5e-2, programs=programs)


@pytest.mark.gpu
@pytest.mark.parametrize("heads", HEADS)
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("case", CASES)
def test_paged_attention_on_gpu_fp16(case, head_dim, heads):
    from nanovllm.kernels import paged_attention
    check(paged_attention, CASES[case], "cuda", torch.float16, head_dim=head_dim, num_heads=heads[0],
          num_kv_heads=heads[1], page=16, tol=2e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("case", CASES)
def test_paged_attention_padded_as_a_graph_on_gpu(case):
    """The layout a CUDA graph of a 512-token, 32-sequence step replays: padding tokens and empty sequences."""
    from nanovllm.kernels import paged_attention
    seqs = CASES[case]
    check(paged_attention, seqs, "cuda", torch.bfloat16, head_dim=128, num_heads=16, num_kv_heads=8, page=16,
          tol=5e-2, padding=(512 - sum(n for _, n in seqs), 32 - len(seqs), 512))
    for page in (16, 256):  # a key tile across pages, and within one (the engine's default page; 19 pages)
        check(paged_attention, seqs + [(4500, 200), (0, 1100)], "cuda", torch.bfloat16, head_dim=128, num_heads=16,
              num_kv_heads=8, page=page, tol=5e-2,
              padding=(2048 - sum(n for _, n in seqs) - 1300, 30 - len(seqs), 2048))


@pytest.mark.gpu
@pytest.mark.parametrize("head_dim", [96, 256])
@pytest.mark.parametrize("case", CASES)
def test_paged_attention_on_gpu_bf16(case, head_dim):
    """bf16 and head sizes fa2 takes beyond 64 and 128 (the fa2 backend decodes with this kernel)."""
    from nanovllm.kernels import paged_attention
    check(paged_attention, CASES[case], "cuda", torch.bfloat16, head_dim=head_dim, num_heads=8, page=16, tol=5e-2)
