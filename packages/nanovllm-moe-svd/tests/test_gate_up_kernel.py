"""The one-kernel gate and up bases with SiLU-and-multiply, against the two matmuls and silu_and_mul it replaces:
under TRITON_INTERPRET=1 on CPU (float32) and on a GPU (bf16, fp16)."""
import pytest
import torch

# rows, columns, rank: decode-sized steps (the kernel) and larger ones (the matmuls it leaves to cuBLAS)
CASES = [(1, 96, 12), (2, 300, 256), (32, 14336 // 64, 256), (20, 200, 40), (33, 96, 17), (600, 96, 17)]


def check(device, dtype, rows, columns, rank, tol):
    from nanovllm.layers.activation import silu_and_mul
    from nanovllm_moe_svd.kernels import gate_up_silu
    generator = torch.Generator().manual_seed(rows)
    t = torch.randn(rows, 2 * rank, generator=generator).to(device, dtype)
    u_gate, u_up = (torch.randn(columns, rank, generator=generator).div(rank ** 0.5).to(device, dtype) for _ in "gu")
    expected = silu_and_mul(torch.cat([t[:, :rank] @ u_gate.t(), t[:, rank:] @ u_up.t()], 1))
    got = gate_up_silu(t, u_gate, u_up)
    assert got.shape == expected.shape and got.dtype == dtype
    error = ((got.float() - expected.float()).norm() / expected.float().norm()).item()
    assert error < tol, (rows, columns, rank, error)
    if dtype != torch.float32:  # rounded where the matmuls and silu_and_mul round: a few units in the last place
        torch.testing.assert_close(got, expected, rtol=2 ** -6, atol=2 ** -8)


def check_interpreted():
    for case in CASES:
        check("cpu", torch.float32, *case, tol=1e-5)
    with pytest.raises(AssertionError):  # the check catches the halves swapped
        from nanovllm_moe_svd import kernels
        original = kernels.gate_up_silu
        kernels.gate_up_silu = lambda t, g, u: original(t, u, g)
        try:
            check("cpu", torch.float32, *CASES[1], tol=1e-5)
        finally:
            kernels.gate_up_silu = original


def test_gate_up_silu_interpreted_on_cpu():
    from nanovllm.testing import run_interpreted
    run_interpreted(__file__, "check_interpreted")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gate_up_silu_on_the_gpu(dtype):
    for case in CASES:
        check("cuda", dtype, *case, tol=1e-2)


def test_gate_up_silu_compiles_for_turing():
    """fp16 on an RTX 2080 Ti: nothing sm80+, and the program within its 64 KiB of shared memory."""
    from nanovllm.testing.turing import CUDA, FP16, compile_for_turing, fits
    from nanovllm_moe_svd import kernels
    config = kernels.tile_config(256, CUDA)
    values = dict(t_ptr=FP16, u_gate_ptr=FP16, u_up_ptr=FP16, out_ptr=FP16, M=2, N=14336, R=256, stride_t=512,
                  stride_u=256, stride_out=14336, **{k: v for k, v in config.items() if k.isupper()})
    fits(compile_for_turing(kernels._gate_up_silu_kernel, values, config["num_warps"], config["num_stages"]))
