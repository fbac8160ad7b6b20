"""Decode speed of a Mixtral-8x7B-shaped model with experts resident on the GPU or offloaded to host memory.

    python tools/bench_moe.py [--path DIR] [--layers N] [--budget-gib 11] [--steps 32] [--json FILE]
                              [--managers resident offload-cached offload] [--profile]

Writes (once) a checkpoint with Mixtral 8x7B's exact layer shape (hidden 4096, 8 experts of 14336, top 2,
32 query and 8 KV heads, vocabulary 32000) and random bf16 weights, one safetensors file per layer, with as
many layers as the disk holds (at most 32). Then, each in its own process, decode tok/s at batch 1 and 16:

  resident        every expert on the GPU: the grouped Triton kernel inside CUDA graphs
  offload-cached  experts in pinned host memory and every one cached on the GPU: offload's compute alone
  offload         experts in pinned host memory, everything PyTorch allocates held to --budget-gib less 0.5 GiB
                  (a small card's CUDA context); the memory the process holds in all is reported beside it

with their bounds: resident against the bytes a step must read at the GPU's HBM bandwidth (distinct experts
per step counted in the offload-cached run, whose tokens and routing are the same); offload against the
experts a step had to bring in (needed and not cached) at the host-to-device bandwidth measured here.
Copy time hidden = 1 - (offload step - offload-cached step) / (time to copy what offload moved).
Decode time is a run of 1 + steps tokens minus a run of 1 token (prefill only), prefix caching off.
--profile adds, for each run, the GPU kernels of a batch-1 run of 1 + steps tokens divided by steps: per decode
step, with the prefill's share (torch.profiler, CUDA graphs included).
"""
import argparse
import json
import os
import random
import shutil
import time

from bench_throughput import GPU_PEAKS, run_child

MIXTRAL_8X7B = dict(hidden_size=4096, intermediate_size=14336, num_local_experts=8, num_experts_per_tok=2,
                    num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=32000,
                    max_position_embeddings=32768, rms_norm_eps=1e-5, rope_theta=1e6, tie_word_embeddings=False)
H, I, E = MIXTRAL_8X7B["hidden_size"], MIXTRAL_8X7B["intermediate_size"], MIXTRAL_8X7B["num_local_experts"]
KV_DIM = MIXTRAL_8X7B["num_key_value_heads"] * MIXTRAL_8X7B["head_dim"]
EXPERT_BYTES = 3 * H * I * 2
ATTENTION_BYTES = (2 * H * H + 2 * H * KV_DIM) * 2
LAYER_BYTES = E * EXPERT_BYTES + ATTENTION_BYTES + (E * H + 2 * H) * 2
OUTER_BYTES = 2 * MIXTRAL_8X7B["vocab_size"] * H * 2  # embedding and LM head
BATCHES, PROMPT_LEN = (1, 16), 32
MANAGERS = ["resident", "offload-cached", "offload"]
KV_GIB, ACTIVATION_GIB, CUDA_CONTEXT_GIB = 0.35, 0.5, 0.5
ENGINE = dict(max_model_len=256, max_num_seqs=16, max_num_batched_tokens=512, kv_cache_memory_gib=KV_GIB,
              enable_prefix_caching=False)


def kv_cache_gib(layers: int) -> float:
    """KV cache for max_num_seqs sequences of max_model_len at once, so a batch-16 step is one batch and not two
    waves (32 layers need 0.5 GiB), and no less than KV_GIB."""
    needed = layers * 2 * KV_DIM * 2 * ENGINE["max_model_len"] * ENGINE["max_num_seqs"] / 2**30
    return max(KV_GIB, needed * 1.05)


def layers_the_disk_holds(path: str, spare_gib: float = 3.0) -> int:
    free = shutil.disk_usage(os.path.dirname(os.path.abspath(path))).free
    return max(1, min(32, int((free - spare_gib * 2**30 - OUTER_BYTES) // LAYER_BYTES)))


def num_layers(path: str) -> int:
    with open(os.path.join(path, "config.json")) as f:
        return json.load(f)["num_hidden_layers"]


def write_checkpoint(path: str, layers: int, experts: bool = True):
    """Random N(0, 0.02) bf16 weights drawn on the GPU, written layer by layer (host memory holds one layer);
    ``experts=False`` leaves the dense experts out (for a manager that brings its own weights)."""
    import torch
    from safetensors.torch import save_file
    from transformers import MixtralConfig

    from nanovllm.testing import make_tokenizer
    if os.path.exists(os.path.join(path, "config.json")) and num_layers(path) == layers:
        return
    shutil.rmtree(path, ignore_errors=True)
    os.makedirs(path)
    tokenizer = make_tokenizer()
    generator = torch.Generator("cuda").manual_seed(0)

    def randn(*shape):
        return (torch.randn(shape, device="cuda", dtype=torch.bfloat16, generator=generator) * 0.02).cpu()

    def ones(n):
        return torch.ones(n, dtype=torch.bfloat16)

    vocab = MIXTRAL_8X7B["vocab_size"]
    save_file({"model.embed_tokens.weight": randn(vocab, H), "model.norm.weight": ones(H),
               "lm_head.weight": randn(vocab, H)}, os.path.join(path, "model-outer.safetensors"))
    for i in range(layers):
        p = f"model.layers.{i}."
        tensors = {p + "input_layernorm.weight": ones(H), p + "post_attention_layernorm.weight": ones(H),
                   p + "self_attn.q_proj.weight": randn(H, H), p + "self_attn.k_proj.weight": randn(KV_DIM, H),
                   p + "self_attn.v_proj.weight": randn(KV_DIM, H), p + "self_attn.o_proj.weight": randn(H, H),
                   p + "block_sparse_moe.gate.weight": randn(E, H)}
        for e in range(E if experts else 0):
            q = f"{p}block_sparse_moe.experts.{e}."
            tensors |= {q + "w1.weight": randn(I, H), q + "w3.weight": randn(I, H), q + "w2.weight": randn(H, I)}
        save_file(tensors, os.path.join(path, f"model-{i:05d}.safetensors"), metadata={"format": "pt"})
        print(f"  layer {i + 1}/{layers} written", flush=True)
    torch.cuda.empty_cache()  # the engines' processes count the GPU's free memory
    tokenizer.save_pretrained(path)
    MixtralConfig(**MIXTRAL_8X7B, num_hidden_layers=layers, architectures=["MixtralForCausalLM"],
                  eos_token_id=tokenizer.eos_token_id, dtype="bfloat16").save_pretrained(path)


def host_to_device_bandwidth(gib: float = 1.0, repeats: int = 5) -> float:
    """Bytes/s of a pinned host -> GPU copy of an expert-sized buffer, best of ``repeats``."""
    import torch
    host = torch.empty(int(gib * 2**30), dtype=torch.uint8, pin_memory=True)
    device = torch.empty_like(host, device="cuda")
    best = float("inf")
    for _ in range(repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        device.copy_(host, non_blocking=True)
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return host.numel() / best


def kernel_profile(llm, prompts: list[list[int]], steps: int, rows: int = 25) -> list[tuple[str, float, float]]:
    """(kernel, launches, microseconds) per decode step of the costliest kernels at batch ``len(prompts)``, the
    prefill's share included."""
    from torch.profiler import ProfilerActivity, profile

    from nanovllm import SamplingParams
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        llm.generate(prompts, SamplingParams(temperature=0, max_tokens=1 + steps, ignore_eos=True), use_tqdm=False)
    kernels = [(e.key, e.count / steps, e.device_time_total / steps) for e in prof.key_averages()
               if e.device_time_total > 0]
    return sorted(kernels, key=lambda k: -k[2])[:rows]


def decode_timings(llm, caches: list, steps: int) -> dict:
    """Per batch size: decode seconds per step (1 + steps tokens less 1 token), tok/s, first tokens, and the
    offload caches' counters per step."""
    from nanovllm import SamplingParams
    rng = random.Random(0)

    def counters():
        return [sum(getattr(c, k) for c in caches) for k in ("hits", "misses", "prefetches", "prefetch_hits")]

    def timed(prompts, max_tokens):
        before = counters()
        start = time.perf_counter()
        outputs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True),
                               use_tqdm=False)
        seconds = time.perf_counter() - start
        return seconds, [b - a for a, b in zip(before, counters())], outputs

    batches = {}
    for batch in BATCHES:
        prompts = [[rng.randrange(MIXTRAL_8X7B["vocab_size"]) for _ in range(PROMPT_LEN)] for _ in range(batch)]
        timed(prompts, 4)  # warm-up: kernels compiled for this batch size
        prefill_seconds, prefill_counts, _ = timed(prompts, 1)
        total_seconds, total_counts, outputs = timed(prompts, 1 + steps)
        hits, misses, prefetches, prefetch_hits = [t - p for t, p in zip(total_counts, prefill_counts)]
        step = (total_seconds - prefill_seconds) / steps
        batches[batch] = {
            "step_seconds": step, "tok_per_s": batch / step, "first_tokens": [o["token_ids"][:8] for o in outputs],
            # per decode step, summed over layers
            "distinct_experts": (hits + misses) / steps, "misses": misses / steps, "prefetches": prefetches / steps,
            "prefetch_hits": prefetch_hits / steps}
    return batches


def run_config(path: str, name: str, budget_gib: float, steps: int, profile: bool) -> dict:
    """In a child process: decode seconds per step at each batch size, and the offload caches' counters."""
    import torch

    from nanovllm import LLM
    from nanovllm.default_plugins.expert_managers import OffloadedExperts
    layers = num_layers(path)
    options = dict(ENGINE, kv_cache_memory_gib=kv_cache_gib(layers))
    if name == "resident":
        options["expert_manager"] = "resident"
    elif name == "offload-cached":
        options |= dict(expert_manager="offload", offload_experts_per_layer=E)
    else:  # everything the engine allocates stays inside the budget, less the CUDA context outside the allocator
        total = torch.cuda.get_device_properties(0).total_memory
        cap = (budget_gib - CUDA_CONTEXT_GIB) * 2**30
        torch.cuda.set_per_process_memory_fraction(cap / total)
        outside_cache = (layers * ATTENTION_BYTES + OUTER_BYTES) / 2**30 + kv_cache_gib(layers) + ACTIVATION_GIB
        cache_gib = cap / 2**30 - outside_cache
        options |= dict(expert_manager="offload", offload_cache_gib=cache_gib, gpu_memory_utilization=cap / total)
    start = time.perf_counter()
    llm = LLM(path, **options)
    load_seconds = time.perf_counter() - start
    caches = [m for m in llm.model_runner.model.modules() if isinstance(m, OffloadedExperts)]
    result = {"load_seconds": load_seconds, "peak_gib": 0.0, "batches": decode_timings(llm, caches, steps)}
    if caches:
        result["slots_per_layer"] = caches[0].num_slots
    if profile:
        prompt = [random.Random(0).randrange(MIXTRAL_8X7B["vocab_size"]) for _ in range(PROMPT_LEN)]
        result["profile"] = kernel_profile(llm, [prompt], steps)
    result["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    free, total = torch.cuda.mem_get_info()
    result["device_used_gib"] = (total - free) / 2**30  # what the GPU reports: the allocator's pool and the context
    result["outside_allocator_gib"] = (total - free - torch.cuda.memory_reserved()) / 2**30
    llm.exit()
    return result


def child(path, name, budget_gib, steps, profile):
    args = ["--path", path, "--child", name, "--budget-gib", str(budget_gib), "--steps", str(steps)]
    return run_child(__file__, args + (["--profile"] if profile else []), name)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--path", default="/tmp/mixtral-8x7b-shape")
    parser.add_argument("--layers", type=int, help="default: as many as the disk holds (at most 32)")
    parser.add_argument("--budget-gib", type=float, default=11.0, help="GPU memory for the offload run")
    parser.add_argument("--steps", type=int, default=32, help="decode steps timed per batch size")
    parser.add_argument("--json")
    parser.add_argument("--managers", nargs="+", choices=MANAGERS, default=MANAGERS,
                        help="runs to make (the bounds need offload-cached; the table needs all three)")
    parser.add_argument("--profile", action="store_true", help="print each run's kernels per batch-1 decode step")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print("RESULT " + json.dumps(run_config(args.path, args.child, args.budget_gib, args.steps, args.profile)),
              flush=True)
        return
    import torch
    layers = args.layers or layers_the_disk_holds(args.path)
    gpu = torch.cuda.get_device_name()
    print(f"{gpu}: {layers} Mixtral-8x7B layers ({layers * LAYER_BYTES / 1e9:.1f} GB + "
          f"{OUTER_BYTES / 1e9:.1f} GB embedding and head)", flush=True)
    start = time.perf_counter()
    write_checkpoint(args.path, layers)
    print(f"checkpoint ready in {time.perf_counter() - start:.0f} s", flush=True)
    bandwidth = host_to_device_bandwidth()
    hbm = next((peak[0] for key, peak in GPU_PEAKS.items() if key in gpu), None)
    print(f"host -> device: {bandwidth / 1e9:.1f} GB/s measured; HBM {hbm / 1e12 if hbm else float('nan'):.2f} TB/s "
          f"(datasheet)", flush=True)
    results = {}
    for name in args.managers:
        run = results[name] = child(args.path, name, args.budget_gib, args.steps, args.profile)
        slots = f", {run['slots_per_layer']} expert slots per layer" if "slots_per_layer" in run else ""
        print(f"{name}: loaded in {run['load_seconds']:.0f} s, peak {run['peak_gib']:.1f} GiB allocated, "
              f"{run['device_used_gib']:.1f} GiB used on the GPU (of which {run['outside_allocator_gib']:.1f} GiB "
              f"outside PyTorch's allocator){slots}", flush=True)
        for kernel, launches, micros in run.get("profile", []):
            print(f"  {micros:9.1f} us {launches:6.1f}x  {kernel[:110]}")
        for batch, row in run["batches"].items():
            print(f"  batch {batch}: {row['tok_per_s']:.1f} tok/s", flush=True)
    if set(MANAGERS) - set(args.managers):  # no bounds without all three runs: the runs alone
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"device": gpu, "layers": layers, "results": results}, f, indent=1)
        return
    summary = {"device": gpu, "layers": layers, "h2d_bytes_per_s": bandwidth, "hbm_bytes_per_s": hbm,
               "budget_gib": args.budget_gib, "results": results, "batches": {}}
    print(f"\n batch  {'resident':>9} {'HBM bound':>10} {'of bound':>8}  {'offload':>8} {'copy bound':>10} "
          f"{'bound/off':>9} {'hit rate':>8} {'hidden':>6}   (tok/s)")
    for batch in map(str, BATCHES):
        resident, cached, offload = (results[n]["batches"][batch] for n in ("resident", "offload-cached", "offload"))
        same = resident["first_tokens"] == cached["first_tokens"] == offload["first_tokens"]
        # resident reads the attention weights, the LM head and each distinct expert once per step
        step_bytes = layers * ATTENTION_BYTES + OUTER_BYTES / 2 + cached["distinct_experts"] * EXPERT_BYTES
        hbm_bound = int(batch) / (step_bytes / hbm) if hbm else None
        must_move = offload["misses"] + offload["prefetch_hits"]
        copy_bound = int(batch) / (must_move * EXPERT_BYTES / bandwidth) if must_move else float("inf")
        moved_seconds = (offload["misses"] + offload["prefetches"]) * EXPERT_BYTES / bandwidth
        hidden = 1 - (offload["step_seconds"] - cached["step_seconds"]) / moved_seconds if moved_seconds else 1.0
        hit_rate = 1 - offload["misses"] / offload["distinct_experts"]
        row = {"resident_tok_per_s": resident["tok_per_s"], "hbm_bound_tok_per_s": hbm_bound,
               "offload_cached_tok_per_s": cached["tok_per_s"], "offload_tok_per_s": offload["tok_per_s"],
               "copy_bound_tok_per_s": copy_bound, "hit_rate": hit_rate,
               "hit_rate_without_prefetch": 1 - must_move / offload["distinct_experts"],
               "copy_time_hidden": hidden, "same_first_tokens": same}
        summary["batches"][batch] = row
        print(f"{batch:>6}  {resident['tok_per_s']:9.1f} {hbm_bound or float('nan'):10.1f} "
              f"{resident['tok_per_s'] / hbm_bound if hbm_bound else float('nan'):8.0%}  {offload['tok_per_s']:8.2f} "
              f"{copy_bound:10.2f} {copy_bound / offload['tok_per_s']:8.2f}x {hit_rate:8.0%} {hidden:6.0%}"
              + ("" if same else "   (first tokens differ between managers!)"))
    print("SUMMARY " + json.dumps(summary))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=1)


if __name__ == "__main__":
    main()
