"""Low-rank experts beside dense ones on Mixtral 8x7B's exact layer shape, random weights, in one run.

    python tools/bench_moe_svd.py [--layers 4] [--ranks 256 1024] [--budget-gib 11] [--steps 32] [--json FILE]
                                  [--profile] [--baseline LABEL=PYTHONPATH ...]

Runs, each in its own process (decode tok/s at batch 1 and 16 as tools/bench_moe.py measures them):
  resident, offload-cached, offload   on a --layers checkpoint with dense experts (offload under --budget-gib)
  svd-R                               the same checkpoint with random rank-R factors beside it
  svd-256-32                          all 32 layers under --budget-gib: a checkpoint without dense experts (the
                                      manager needs none) and rank-256 factors, attention and KV cache included
  svd-256-32 (LABEL)                  the same with --baseline's sources first on the path (another commit's
                                      packages), in the same run
and reports each svd run against its HBM bound: per decode step the attention and router weights, half the
embedding and head, each layer's bases U, and the distinct experts' factors V (counted in the offload-cached run;
the routing of these random weights does not depend on how experts are stored). --profile prints each svd
run's costliest GPU kernels per decode step at each batch size (as tools/bench_moe.py --profile does at batch 1).
"""
import argparse
import json
import os
import random
import time

from bench_moe import (ATTENTION_BYTES, BATCHES, CUDA_CONTEXT_GIB, E, ENGINE, EXPERT_BYTES, H, I, MIXTRAL_8X7B,
                       OUTER_BYTES, PROMPT_LEN, child as dense_child, decode_timings, kernel_profile, kv_cache_gib,
                       num_layers, write_checkpoint)
from bench_throughput import GPU_PEAKS, run_child

ROUTER_BYTES = E * H * 2


def factor_bytes(rank: int) -> tuple[int, int]:
    """(a layer's bases, one expert's factors) in bf16."""
    return (2 * I * rank + H * rank) * 2, (2 * rank * H + rank * I) * 2


def write_factors(folder: str, layers: int, rank: int):
    """Random bf16 factors: orthonormal bases, N(0, 0.02) expert factors (so U V is as large as the dense weights)."""
    import torch
    from safetensors.torch import save_file
    if os.path.exists(os.path.join(folder, "metadata.json")):
        return
    os.makedirs(os.path.join(folder, "V_experts"), exist_ok=True)
    generator = torch.Generator("cuda").manual_seed(rank)

    def basis(rows):
        return torch.linalg.qr(torch.randn(rows, rank, device="cuda", generator=generator)).Q.bfloat16().contiguous().cpu()

    def factor(cols):
        return (torch.randn(rank, cols, device="cuda", generator=generator) * 0.02).bfloat16().cpu()
    bases = {}
    for layer in range(layers):
        bases |= {f"layer_{layer}.gate": basis(I), f"layer_{layer}.up": basis(I), f"layer_{layer}.down": basis(H)}
        for expert in range(E):
            save_file({"gate": factor(H), "up": factor(H), "down": factor(I)},
                      os.path.join(folder, "V_experts", f"layer_{layer}_expert_{expert}.safetensors"))
    save_file(bases, os.path.join(folder, "U_matrices.safetensors"))
    torch.cuda.empty_cache()  # the engines' processes count the GPU's free memory
    with open(os.path.join(folder, "metadata.json"), "w") as f:
        json.dump(dict(rank=rank, dtype="bfloat16", method="random", settings={}, hidden_size=H,
                       layers={str(i): dict(num_experts=E, intermediate_size=I) for i in range(layers)}), f)


def run_svd(path: str, folder: str, budget_gib: float | None, steps: int, profile: bool) -> dict:
    """In a child process: the svd manager's decode timings and memory, inside ``budget_gib`` when given."""
    import torch

    from nanovllm import LLM
    options = dict(ENGINE, expert_manager="svd", svd_experts_dir=folder,
                   kv_cache_memory_gib=kv_cache_gib(num_layers(path)))
    if budget_gib:
        total = torch.cuda.get_device_properties(0).total_memory
        cap = (budget_gib - CUDA_CONTEXT_GIB) * 2**30
        torch.cuda.set_per_process_memory_fraction(cap / total)
        options["gpu_memory_utilization"] = cap / total
    start = time.perf_counter()
    llm = LLM(path, **options)
    load_seconds = time.perf_counter() - start
    weights_gib = torch.cuda.memory_allocated() / 2**30
    result = dict(load_seconds=load_seconds, weights_and_cache_gib=weights_gib,
                  batches=decode_timings(llm, [], steps))
    if profile:
        rng = random.Random(0)
        prompts = [[rng.randrange(MIXTRAL_8X7B["vocab_size"]) for _ in range(PROMPT_LEN)] for _ in range(max(BATCHES))]
        result["profile"] = {batch: kernel_profile(llm, prompts[:batch], steps) for batch in BATCHES}
    result["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    free, total = torch.cuda.mem_get_info()
    result["device_used_gib"] = (total - free) / 2**30
    llm.exit()
    return result


def svd_child(path: str, folder: str, budget_gib: float, steps: int, profile: bool, label: str = "",
              pythonpath: str | None = None) -> dict:
    args = ["--child", path, folder, str(budget_gib), "--steps", str(steps)] + (["--profile"] if profile else [])
    run = run_child(__file__, args, f"svd on {folder}", pythonpath)
    for batch, kernels in run.get("profile", {}).items():
        print(f"{folder}{label}, batch {batch}: kernels per decode step", flush=True)
        for kernel, launches, micros in kernels:
            print(f"  {micros:9.1f} us {launches:6.1f}x  {kernel[:110]}", flush=True)
    return run


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--path", default="/tmp/mixtral-8x7b-shape")
    parser.add_argument("--layers", type=int, default=4, help="layers of the checkpoint with dense experts")
    parser.add_argument("--ranks", type=int, nargs="+", default=[256, 1024])
    parser.add_argument("--budget-gib", type=float, default=11.0)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--json")
    parser.add_argument("--profile", action="store_true", help="print each svd run's kernels per decode step")
    parser.add_argument("--baseline", action="append", default=[], metavar="LABEL=PYTHONPATH",
                        help="also run svd-256-32 with these sources first on the path")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        path, folder, budget = args.child
        print("RESULT " + json.dumps(run_svd(path, folder, float(budget), args.steps, args.profile)), flush=True)
        return
    import torch
    gpu = torch.cuda.get_device_name()
    hbm = next((peak[0] for key, peak in GPU_PEAKS.items() if key in gpu), None)
    write_checkpoint(args.path, args.layers)
    full_path = args.path + "-32-no-experts"
    write_checkpoint(full_path, 32, experts=False)
    summary = dict(device=gpu, layers=args.layers, budget_gib=args.budget_gib, memory={}, runs={})
    for rank in args.ranks:
        bases, expert = factor_bytes(rank)
        summary["memory"][rank] = dict(layer_gib=(bases + E * expert) / 2**30, all_32_gib=32 * (bases + E * expert) / 2**30,
                                       dense_layer_gib=E * EXPERT_BYTES / 2**30)
        print(f"rank {rank}: {(bases + E * expert) / 2**20:.0f} MiB per layer (dense experts: "
              f"{E * EXPERT_BYTES / 2**20:.0f} MiB), {32 * (bases + E * expert) / 2**30:.2f} GiB for 32 layers", flush=True)
    for name in ("resident", "offload-cached", "offload"):
        summary["runs"][name] = dense_child(args.path, name, args.budget_gib, args.steps, False)
    for rank in args.ranks:
        folder = os.path.join(args.path, f"svd-{rank}")
        write_factors(folder, args.layers, rank)
        summary["runs"][f"svd-{rank}"] = svd_child(args.path, folder, 0, args.steps, args.profile)
    folder = os.path.join(full_path, "svd-256")
    write_factors(folder, 32, 256)
    summary["runs"]["svd-256-32"] = svd_child(full_path, folder, args.budget_gib, args.steps, args.profile)
    for label, pythonpath in (baseline.split("=", 1) for baseline in args.baseline):
        summary["runs"][f"svd-256-32 ({label})"] = svd_child(full_path, folder, args.budget_gib, args.steps,
                                                             args.profile, f" ({label})", pythonpath)
    run = summary["runs"]["svd-256-32"]
    print(f"svd-256, 32 layers under {args.budget_gib} GiB: {run['weights_and_cache_gib']:.2f} GiB allocated after "
          f"loading, peak {run['peak_gib']:.2f} GiB, {run['device_used_gib']:.2f} GiB used on the GPU", flush=True)
    print(f"\n{'run':>24} {'layers':>6} " + " ".join(f"{f'batch {b} tok/s':>14} {'of bound':>8}" for b in BATCHES))
    for name, run in summary["runs"].items():
        layers = 32 if "-32" in name else args.layers
        cells = []
        for batch in BATCHES:
            row = run["batches"][str(batch)]
            bound = ""
            if name.startswith("svd") and hbm:
                rank = int(name.split("-")[1])
                bases, expert = factor_bytes(rank)
                distinct = summary["runs"]["offload-cached"]["batches"][str(batch)]["distinct_experts"] / args.layers
                step_bytes = layers * (ATTENTION_BYTES + ROUTER_BYTES + bases + distinct * expert) + OUTER_BYTES / 2
                row["hbm_bound_tok_per_s"] = batch / (step_bytes / hbm)
                bound = f"{row['tok_per_s'] / row['hbm_bound_tok_per_s']:.0%}"
            cells.append(f"{row['tok_per_s']:14.1f} {bound:>8}")
        print(f"{name:>24} {layers:>6} " + " ".join(cells))
    print("SUMMARY " + json.dumps(summary))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=1)


if __name__ == "__main__":
    main()
