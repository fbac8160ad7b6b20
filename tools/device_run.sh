#!/usr/bin/env bash
# Set up a GPU machine from this checkout (no registry there) and run the GPU tests and benchmarks.
#   tools/device_run.sh [tests|bench|latency|profile|fa1|moe|svd|snapkv|all]...   logs and summaries go to $OUT (default ./out)
# Needs, in the ignored folder .gpu/: wheels/fa2/*.whl and wheels/fa1/*.whl (flash-attn 2 and 1 built
# for the GPU's image) and, for the side-by-side benchmark, nano-vllm/ (an upstream nano-vllm
# checkout, never committed). The two flash-attn majors live in separate folders, /tmp/fa2 and /tmp/fa1.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
python3 -m pip install -q --no-index --no-deps --target /tmp/fa2 .gpu/wheels/fa2/*.whl
python3 -m pip install -q --no-index --no-deps --target /tmp/fa1 .gpu/wheels/fa1/*.whl
export PYTHONPATH=/tmp/fa2
python3 -m pip install -q --no-index --no-deps --no-build-isolation -e packages/nanovllm-core -e packages/nanovllm-models \
    -e packages/nanovllm-attn-mps -e packages/nanovllm-attn-fa2 -e packages/nanovllm-attn-fa1 -e packages/nanovllm-snapkv \
    -e packages/nanovllm-moe-svd \
    2>&1 | grep -v WARNING
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -m nanovllm.cli info 2>&1 | tee "$OUT/info.txt"
status=0
for step in "${@:-all}"; do
    if [[ $step == tests || $step == all ]]; then
        python3 -m pytest -m "gpu or multi_gpu" -q -p no:cacheprovider --ignore=packages/nanovllm-attn-fa1 2>&1 \
            | tee "$OUT/gpu_tests.log" || status=1
    fi
    if [[ $step == bench || $step == all ]]; then
        upstream=(); [[ -d .gpu/nano-vllm ]] && upstream=(--upstream .gpu/nano-vllm)
        python3 tools/bench_throughput.py "${upstream[@]}" --json "$OUT/summary.json" 2>&1 | tee "$OUT/bench.log" || status=1
        python3 tools/bench_sampler.py 2>&1 | tee "$OUT/sampler.log" || status=1
        python3 tools/bench_paged_attention.py 2>&1 | tee "$OUT/paged_attention.log" || status=1
    fi
    if [[ $step == latency || $step == all ]]; then
        python3 tools/bench_latency.py --json "$OUT/latency.json" 2>&1 | tee "$OUT/latency.log" || status=1
    fi
    if [[ $step == profile || $step == all ]]; then
        python3 tools/profile_steps.py 2>&1 | tee "$OUT/profile.log" || status=1
    fi
    if [[ $step == fa1 || $step == all ]]; then
        PYTHONPATH=/tmp/fa1 python3 -m pytest -m gpu -q -p no:cacheprovider packages/nanovllm-attn-fa1 \
            packages/nanovllm-core/tests/test_store_kv_kernel.py packages/nanovllm-core/tests/test_rotary_kernel.py \
            packages/nanovllm-core/tests/test_paged_attention_kernel.py packages/nanovllm-core/tests/test_sampling_kernel.py \
            2>&1 | tee "$OUT/fa1_tests.log" || status=1
        PYTHONPATH=/tmp/fa1 python3 tools/bench_prefill_fa1.py 2>&1 | tee "$OUT/fa1_prefill.log" || status=1
        python3 tools/bench_throughput.py --dtype float16 --backend fa1=/tmp/fa1 --json "$OUT/fa1_vs_fa2.json" 2>&1 \
            | tee "$OUT/fa1_vs_fa2.log" || status=1
    fi
    if [[ $step == moe || $step == all ]]; then
        python3 -m pytest -m gpu -q -p no:cacheprovider packages/nanovllm-models/tests/test_moe_gpu.py \
            packages/nanovllm-core/tests/test_grouped_moe_kernel.py \
            packages/nanovllm-core/tests/test_routing_kernel.py 2>&1 | tee "$OUT/moe_tests.log" || status=1
        python3 tools/bench_moe.py --json "$OUT/moe.json" 2>&1 | tee "$OUT/moe.log" || status=1
    fi
    if [[ $step == svd || $step == all ]]; then
        python3 -m pytest -m gpu -q -p no:cacheprovider packages/nanovllm-moe-svd 2>&1 | tee "$OUT/svd_tests.log" || status=1
        python3 tools/bench_moe_svd.py --ranks 256 --profile --json "$OUT/svd.json" 2>&1 | tee "$OUT/svd.log" || status=1
    fi
    if [[ $step == snapkv || $step == all ]]; then
        python3 tools/train_retrieval_model.py --output "$OUT/retrieval" 2>&1 | tee "$OUT/retrieval_train.log" || status=1
        python3 tools/eval_kv_retention.py "$OUT/retrieval" 2>&1 | tee "$OUT/retrieval_eval.log" || status=1
        python3 tools/bench_snapkv.py --json "$OUT/snapkv.json" 2>&1 | tee "$OUT/snapkv.log" || status=1
    fi
done
exit $status
