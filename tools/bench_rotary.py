"""QK norms and rotary embedding alone: core's Triton kernel (one launch) against the compiled PyTorch path it
replaced on CUDA (RMSNorm of q, of k, then the rotation, each through torch.compile).

    python tools/bench_rotary.py

bf16, head size 128, for Qwen3-0.6B's heads (16/8, with QK norms) and Llama-3-8B's (32/8, without), at decode
batch sizes and prompt step sizes. Times from triton.testing.do_bench of each call captured in a CUDA graph, as
the engine's steps run it; the largest difference between the two outputs is printed beside them.
"""
import torch
from bench_paged_attention import in_graph
from triton.testing import do_bench

from nanovllm.kernels.rotary import rotate_queries_keys
from nanovllm.layers.compile import compile_on_cuda
from nanovllm.layers.layernorm import RMSNorm
from nanovllm.layers.rotary_embedding import RotaryEmbedding, apply_rotary

HEAD_DIM = 128
MODELS = {"Qwen3-0.6B (16/8, QK norms)": (16, 8, True), "Llama-3-8B (32/8)": (32, 8, False)}
TOKENS = [1, 16, 64, 256, 2048, 16384]


def main():
    torch.manual_seed(0)
    print(torch.cuda.get_device_name())
    compiled_rotary = compile_on_cuda(apply_rotary)
    print(f"{'model':<28} {'tokens':>6} {'compiled PyTorch':>17} {'Triton kernel':>14} {'max diff':>9}")
    with torch.device("cuda"):
        rope = RotaryEmbedding(HEAD_DIM, 32768, 1000000.0, {})
        for name, (heads, kv_heads, with_norms) in MODELS.items():
            norms = (RMSNorm(HEAD_DIM, 1e-6).bfloat16(), RMSNorm(HEAD_DIM, 1e-6).bfloat16()) if with_norms else None
            for tokens in TOKENS:
                qkv = torch.randn(tokens, (heads + 2 * kv_heads) * HEAD_DIM, dtype=torch.bfloat16)
                q = qkv[:, :heads * HEAD_DIM].view(tokens, heads, HEAD_DIM)
                k = qkv[:, heads * HEAD_DIM:(heads + kv_heads) * HEAD_DIM].view(tokens, kv_heads, HEAD_DIM)
                positions = torch.randint(0, 32768, (tokens,))

                def compiled():
                    qn, kn = (norms[0](q), norms[1](k)) if norms else (q, k)
                    return compiled_rotary(positions, qn, kn, rope.cos_sin_cache)

                def fused():
                    return rotate_queries_keys(positions, q, k, rope.cos_sin_cache, norms)
                diff = max((a.float() - b.float()).abs().max().item() for a, b in zip(compiled(), fused()))
                times = [do_bench(in_graph(run)) * 1000 for run in (compiled, fused)]
                print(f"{name:<28} {tokens:>6} {times[0]:>14.1f} us {times[1]:>11.1f} us {diff:>9.4f}")


if __name__ == "__main__":
    main()
