"""The Triton SiLU-and-multiply kernel: under TRITON_INTERPRET=1 on CPU (CI), and compiled on a GPU."""
import pytest
import torch
import torch.nn.functional as F


def reference(x: torch.Tensor) -> torch.Tensor:
    gate, up = x.chunk(2, -1)
    return F.silu(gate) * up


def inputs(device, dtype):
    """[rows, 2 * width] with widths below, above and not a multiple of the kernel's 1,024 columns; 3-D; a view
    whose rows are a slice of wider ones; no rows."""
    wide = torch.randn(4, 2 * 1500 + 10, device=device).to(dtype)
    return [torch.randn(5, 2 * 48, device=device).to(dtype), torch.randn(3, 2 * 1500, device=device).to(dtype),
            torch.randn(2, 3, 2 * 20, device=device).to(dtype), wide[:, :2 * 1500], wide[:0, :2 * 1500]]


def check_interpreted():
    from nanovllm.kernels.activation import silu_and_mul
    for dtype in (torch.float32, torch.float16):  # numpy, under the interpreter, has no bfloat16
        for x in inputs("cpu", dtype):
            out = silu_and_mul(x)
            assert out.shape == x.shape[:-1] + (x.shape[-1] // 2,) and out.dtype == dtype
            torch.testing.assert_close(out, reference(x))  # default tolerances: an ulp or so of the dtype


def test_silu_and_mul_interpreted_on_cpu():
    from nanovllm.testing import run_interpreted
    run_interpreted(__file__, "check_interpreted")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_silu_and_mul_on_gpu(dtype):
    from nanovllm.kernels.activation import silu_and_mul
    for x in inputs("cuda", dtype):
        torch.testing.assert_close(silu_and_mul(x), reference(x))  # default tolerances: an ulp of the dtype
