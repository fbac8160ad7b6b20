"""The Triton matmul for few rows (decode steps' linear layers): under TRITON_INTERPRET=1 on CPU (CI), and compiled
on a GPU, against x W^T + b in float32, with the inputs split in parts (whose last to finish adds them up) or not."""
import pytest
import torch

from nanovllm.kernels import ARRIVAL_COUNTS

# (rows, output features, input features): one row, rows past a power of 2, sizes no tile divides; on CPU the last
# two split K in 4 (the last 64 x 1,030 split empty)
SHAPES = [(1, 48, 96), (5, 40, 2000), (33, 64, 128), (64, 100, 1030)]


def check_linear(device, dtype, rows, n, k, bias, tol):
    from nanovllm.kernels.linear import linear, tiles
    torch.manual_seed(0)
    x = torch.randn(rows, k, device=device).to(dtype)
    w = (torch.randn(n, k, device=device) / k ** 0.5).to(dtype)
    b = torch.randn(n, device=device).to(dtype) if bias else None
    expected = x.float() @ w.float().T + (b.float() if bias else 0)
    for _ in range(2):  # the second call counts its parts from the zeros the first left
        error = (linear(x, w, b).float() - expected).abs().max().item()
        assert error < tol, f"{rows}x{k} times {n}x{k}, split {tiles(rows, n, k, x.device)}: max error {error}"
    assert not any(c.any() for c in ARRIVAL_COUNTS.get(x.device, [])), "counts of finished parts left non-zero"


def check_interpreted():
    from nanovllm.kernels import linear
    splits = [linear.tiles(rows, n, k, torch.device("cpu"))["SPLIT_K"] for rows, n, k in SHAPES]
    assert splits == [1, 4, 1, 4], f"the shapes are no longer split as the tests mean: {splits}"
    for rows, n, k in SHAPES:
        for bias in (False, True):
            check_linear("cpu", torch.float32, rows, n, k, bias, 1e-4)


def test_linear_interpreted_on_cpu():
    from nanovllm.testing import run_interpreted
    run_interpreted(__file__, "check_interpreted")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("rows, n, k", SHAPES + [(8, 4096, 1024), (16, 1024, 3072), (64, 6144, 1024), (2, 1024, 4096)])
def test_linear_on_gpu(dtype, rows, n, k):
    check_linear("cuda", dtype, rows, n, k, bias=n % 2 == 0, tol=2e-2)


@pytest.mark.gpu
def test_linear_split_sums_are_the_same_every_call():
    """The last part to finish adds up the others' sums: were one read before it is stored (a missing fence), some
    of many calls would differ. fp32 sums added in the same order every time: equal to the bit."""
    from nanovllm.kernels.linear import linear, tiles
    x = torch.randn(16, 3072, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(1024, 3072, device="cuda", dtype=torch.bfloat16) / 64
    assert tiles(16, 1024, 3072, x.device)["SPLIT_K"] > 1
    first = linear(x, w)
    for _ in range(300):
        assert torch.equal(linear(x, w), first)


@pytest.mark.gpu
def test_linear_replayed_in_a_cuda_graph():
    """Replays reuse the counts of the parts: each replay must leave them at zero for the next."""
    from nanovllm.kernels.linear import linear
    x = torch.randn(4, 4096, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(1024, 4096, device="cuda", dtype=torch.bfloat16) / 64
    linear(x, w)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = linear(x, w)
    for _ in range(3):
        x.copy_(torch.randn_like(x))
        graph.replay()
        torch.testing.assert_close(y.float(), x.float() @ w.float().T, atol=2e-2, rtol=2e-2)
