"""Every core Triton kernel of the fp16 Turing path (the fa1 backend, the MoE layer, the svd expert manager's
grouped matmuls) compiled for sm_75 on the CPU machine: ptxas takes the code (nothing sm80+) and each program fits
the 64 KiB of shared memory an RTX 2080 Ti gives one. Compiling is not running: the kernels' results are tested
under the interpreter here and on the GPU machine (which has no Turing card)."""
import pytest
import triton

from nanovllm.kernels import grouped_moe, paged_attention, prompt_work, rotary, routing, sampling, store_kv
from nanovllm.testing.turing import CUDA, FP16, FP32, INT32, INT64, compile_for_turing, fits, on_turing

# head size, query heads / KV heads (groups of 2, 4 and 7: Qwen3-0.6B, Llama 3 8B, Qwen2-0.5B), page size
ATTENTION_CASES = [(128, 16, 8, 256), (128, 32, 8, 256), (64, 14, 2, 256), (80, 16, 8, 16)]


@pytest.mark.parametrize("decode", [True, False], ids=["decode", "prompt"])
@pytest.mark.parametrize("head_dim, heads, kv_heads, page", ATTENTION_CASES)
def test_paged_attention_compiles_for_turing(head_dim, heads, kv_heads, page, decode):
    group = heads // kv_heads
    block_m = max(16, triton.next_power_of_2(group)) if decode else prompt_work.tile_rows(group)
    block_d = max(16, triton.next_power_of_2(head_dim))
    with on_turing(paged_attention):
        config = paged_attention.tile_config(block_m, block_d, decode, CUDA)
    values = dict(q_ptr=FP16, k_cache_ptr=FP16, v_cache_ptr=FP16, out_ptr=FP16, partial_ptr=FP32, lse_ptr=FP32,
                  context_lens_ptr=INT32, block_tables_ptr=INT32, q_stride_t=heads * head_dim, q_stride_h=head_dim,
                  o_stride_t=heads * head_dim, o_stride_h=head_dim, block_table_stride=16, scale_log2=0.1,
                  NUM_KV_HEADS=kv_heads, GROUP=group, HEAD_DIM=head_dim, BLOCK_D=block_d, PAGE=page, BLOCK_M=block_m,
                  BLOCK_N=config["BLOCK_N"])
    stages = config.get("num_stages", 2)
    if decode:
        for splits in (1, 4):
            fits(compile_for_turing(paged_attention._decode_kernel, dict(
                values, num_seqs=3, num_heads=heads, SPLITS=splits, MIN_SPLIT_KEYS=paged_attention.MIN_SPLIT_KEYS),
                num_stages=stages))
        fits(compile_for_turing(paged_attention._combine_splits_kernel, dict(
            partial_ptr=FP32, lse_ptr=FP32, out_ptr=FP16, num_seqs=3, num_heads=heads, o_stride_t=heads * head_dim,
            o_stride_h=head_dim, HEAD_DIM=head_dim, BLOCK_D=block_d, SPLITS=4, BLOCK_S=4)))
    else:
        fits(compile_for_turing(paged_attention._prompt_kernel, dict(values, items_ptr=INT32, cu_seqlens_q_ptr=INT32),
                                num_stages=stages))
        fits(compile_for_turing(paged_attention._combine_tiles_kernel, dict(
            partial_ptr=FP32, lse_ptr=FP32, out_ptr=FP16, combines_ptr=INT32, cu_seqlens_q_ptr=INT32,
            o_stride_t=heads * head_dim, o_stride_h=head_dim, NUM_KV_HEADS=kv_heads, GROUP=group, HEAD_DIM=head_dim,
            BLOCK_D=block_d, BLOCK_M=block_m)))


@pytest.mark.parametrize("norm", [True, False], ids=["qk-norms", "rotary-only"])
def test_rotary_and_store_kv_compile_for_turing(norm):
    fits(compile_for_turing(rotary._rotary_kernel, dict(
        q_ptr=FP16, k_ptr=FP16, q_stride=4096, k_stride=4096, q_out_ptr=FP16, k_out_ptr=FP16, positions_ptr=INT64,
        cos_sin_ptr=FP32, q_weight_ptr=FP16, k_weight_ptr=FP16, q_eps=1e-6, k_eps=1e-6, NUM_HEADS=16,
        NUM_KV_HEADS=8, HALF=64, BLOCK_HQ=16, BLOCK_HK=8, BLOCK_HALF=64, NORM=norm)))
    fits(compile_for_turing(store_kv._store_kv_kernel, dict(
        k_ptr=FP16, v_ptr=FP16, k_stride=4096, v_stride=4096, k_cache_ptr=FP16, v_cache_ptr=FP16, slot_ptr=INT64,
        ROW=1024, BLOCK=1024)))


# (N, K) of [E, N, K] weights: Mixtral's gate/up and down; the svd manager's rank-256 factors (V13 [2r, H], V_down)
GROUPED_SHAPES = [(28672, 4096), (4096, 14336), (512, 4096), (256, 14336)]


@pytest.mark.parametrize("block_m", [16, 128], ids=["decode", "prefill"])
@pytest.mark.parametrize("n, k", GROUPED_SHAPES)
def test_grouped_matmul_compiles_for_turing(n, k, block_m):
    with on_turing(grouped_moe):
        config = grouped_moe.tile_config(block_m, n, k, CUDA)
    for split_k, out, scale in ((1, FP16, False), (4, FP32, True)):
        values = dict(a_ptr=FP16, w_ptr=FP16, out_ptr=out, scale_ptr=FP32, pair_ids_ptr=INT64,
                      block_experts_ptr=INT32, num_pairs=2, N=n, K=k, stride_a=k, stride_we=n * k, stride_wn=k,
                      stride_out=n, A_ROW_DIV=2, SCALE=scale, BLOCK_M=block_m, SPLIT_K=split_k,
                      BLOCK_N=config["BLOCK_N"], BLOCK_K=config["BLOCK_K"])
        fits(compile_for_turing(grouped_moe._grouped_matmul_kernel, values, config["num_warps"],
                                config["num_stages"]))


def test_moe_routing_and_sampling_compile_for_turing():
    fits(compile_for_turing(grouped_moe._sort_pairs_kernel, dict(
        ids_ptr=INT64, pair_ids_ptr=INT64, block_experts_ptr=INT32, num_pairs=2, num_experts=8, max_tiles=9, PAIRS=2,
        EXPERTS=8, TILES=16, BLOCK_M=16)))
    fits(compile_for_turing(routing._top_k_routing_kernel, dict(
        logits_ptr=FP16, weights_ptr=FP32, ids_ptr=INT64, tokens=3, num_experts=8, stride_logits=8, TOP_K=2,
        NORMALIZE=True, BLOCK_T=16, EXPERTS=8, K_SLOTS=2)))
    for logits in (FP16, FP32):  # the model's dtype, or float32 after penalties
        fits(compile_for_turing(sampling._chunk_best_kernel, dict(
            logits_ptr=logits, row_stride=151936, temperatures_ptr=FP32, values_ptr=FP32, ids_ptr=INT32, seed=12345,
            vocab=151936, QUARTER=sampling.QUARTER)))
    fits(compile_for_turing(sampling._pick_kernel, dict(values_ptr=FP32, ids_ptr=INT32, out_ptr=INT64,
                                                        num_chunks=38, BLOCK_C=64)))
