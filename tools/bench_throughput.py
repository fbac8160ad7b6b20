"""Throughput on upstream nano-vllm's bench.py workload, nanovllm beside upstream in one run.

    python tools/bench_throughput.py [--upstream PATH_TO_NANO_VLLM_CHECKOUT] [--baseline LABEL=PYTHONPATH]
                                     [--model PATH] [--json FILE]

Each engine runs in its own process on the same checkpoint (Qwen3-0.6B or --shape, random weights, made
locally unless --model is given) and the same workload: 256 sequences, input and output lengths
uniform in 100..1024 from random.seed(0), temperature 0.6, ignore_eos. It prints both figures,
their ratio, and the HBM-bandwidth lower bound for the workload on this GPU.
"""
import argparse
import glob
import json
import os
import random
import subprocess
import sys
import tempfile
import time

# Datasheet peaks: HBM bytes/s and dense bf16 FLOP/s.
GPU_PEAKS = {"H200": (4.8e12, 989e12), "H100": (3.35e12, 989e12), "A100-SXM4-80GB": (2.039e12, 312e12),
             "A100": (1.555e12, 312e12)}


def make_workload(num_seqs, input_len, output_len, seed=0):
    """upstream bench.py's draws, in its order: all prompts first, then all output lengths."""
    random.seed(seed)
    prompts = [[random.randint(0, 10000) for _ in range(random.randint(*input_len))] for _ in range(num_seqs)]
    max_tokens = [random.randint(*output_len) for _ in range(num_seqs)]
    return prompts, max_tokens


def run_engine(model, workload_file, options):
    """In a child process: import whichever `nanovllm` is first on the path and time the workload."""
    from nanovllm import LLM, SamplingParams
    with open(workload_file) as f:
        workload = json.load(f)
    llm = LLM(model, **options)
    params = [SamplingParams(temperature=0.6, ignore_eos=True, max_tokens=n) for n in workload["max_tokens"]]
    llm.generate(["Benchmark: "], SamplingParams(), use_tqdm=False)
    scheduler, preempted = llm.scheduler, []
    if hasattr(scheduler, "preempt"):  # upstream's scheduler does not count them
        scheduler.preempt = lambda seq, preempt=scheduler.preempt: (preempted.append(seq.seq_id), preempt(seq))
    before = getattr(scheduler, "num_preemptions", 0)
    start = time.perf_counter()
    outputs = llm.generate(workload["prompts"], params, use_tqdm=False)
    seconds = time.perf_counter() - start
    tokens = sum(len(o["token_ids"]) for o in outputs)
    blocks = scheduler.block_manager
    print("RESULT " + json.dumps({"output_tokens": tokens, "seconds": seconds, "throughput": tokens / seconds,
                                  "kv_cache_tokens": len(blocks.blocks) * blocks.block_size,
                                  "preemptions": getattr(scheduler, "num_preemptions", 0) - before + len(preempted)}),
          flush=True)


def run_child(script: str, args: list[str], label: str, pythonpath: str | None = None) -> dict:
    """Run ``script args`` in a fresh Python (``pythonpath`` first on its path) and return the JSON of its
    ``RESULT`` line."""
    env = dict(os.environ)
    if pythonpath:
        env["PYTHONPATH"] = pythonpath + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [sys.executable, script, *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode:
        sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-6000:])
        raise SystemExit(f"{label} failed: {' '.join(cmd)}")
    return json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("RESULT "))[len("RESULT "):])


def child(label, model, workload_file, options, pythonpath=None):
    """One engine's run in its own process; prints its figures at once, so that a run cut short keeps them."""
    result = run_child(__file__, ["--run-engine", "--model", model, "--workload", workload_file,
                                  "--options", json.dumps(options)], f"{label} engine run", pythonpath)
    print(f"{label:>14}: {result['output_tokens']} tok in {result['seconds']:.2f} s = {result['throughput']:.0f} tok/s "
          f"(KV cache {result['kv_cache_tokens']:,} tokens, {result['preemptions']} preemptions)", flush=True)
    return result


def hbm_bound(model, prompts, max_tokens, gpu_name, num_gpus=1):
    """Seconds the workload needs at least: KV and weight reads per decode step at peak HBM bandwidth,
    plus prefill FLOPs at peak bf16 rate, spread evenly over ``num_gpus`` tensor-parallel GPUs."""
    from transformers import AutoConfig
    config = AutoConfig.from_pretrained(model)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    kv_per_token = 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim * 2
    weight_bytes = sum(os.path.getsize(f) for f in glob.glob(os.path.join(model, "*.safetensors")))
    params = weight_bytes / 2
    embed_params = config.vocab_size * config.hidden_size
    kv_reads = sum((o - 1) * p + (o - 1) * o / 2 for p, o in zip(map(len, prompts), max_tokens)) * kv_per_token
    weight_reads = (max(max_tokens) - 1) * weight_bytes
    attention_dim = config.num_attention_heads * head_dim
    prefill_flops = sum(2 * (params - embed_params) * p + 2 * config.num_hidden_layers * attention_dim * p * p
                        for p in map(len, prompts))
    bandwidth, flops = next((peaks for key, peaks in GPU_PEAKS.items() if key in gpu_name), GPU_PEAKS["H100"])
    seconds = ((kv_reads + weight_reads) / bandwidth + prefill_flops / flops) / num_gpus
    return dict(bound_seconds=seconds, kv_read_tb=kv_reads / 1e12, weight_read_tb=weight_reads / 1e12,
                prefill_tflop=prefill_flops / 1e12, hbm_tb_per_s=bandwidth / 1e12)


SHAPES = {"qwen3-0.6b": "QWEN3_0_6B", "qwen3-8b": "QWEN3_8B"}  # names in nanovllm.testing


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--upstream", help="path of an upstream nano-vllm checkout to run beside nanovllm")
    parser.add_argument("--model", help="checkpoint folder (default: random weights of --shape)")
    parser.add_argument("--shape", choices=SHAPES, default="qwen3-0.6b", help="the random checkpoint's shape")
    parser.add_argument("--num-seqs", type=int, default=256)
    parser.add_argument("--input-len", type=int, nargs=2, default=(100, 1024))
    parser.add_argument("--output-len", type=int, nargs=2, default=(100, 1024))
    parser.add_argument("--tensor-parallel-size", type=int, default=1)
    parser.add_argument("--also-tp", type=int, action="append", default=[], metavar="N",
                        help="also run nanovllm at tensor-parallel size N (its ratio to it printed)")
    parser.add_argument("--dtype", help="compute dtype for every engine (default: the checkpoint's)")
    parser.add_argument("--backend", action="append", default=[], metavar="NAME=PYTHONPATH",
                        help="also run nanovllm with this attention backend, PYTHONPATH prepended (fa1=/tmp/fa1)")
    parser.add_argument("--baseline", action="append", default=[], metavar="LABEL=PYTHONPATH",
                        help="also run another nanovllm source tree (e.g. an older commit's packages/*/src joined by :)")
    parser.add_argument("--json", help="write the summary here")
    parser.add_argument("--run-engine", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--workload", help=argparse.SUPPRESS)
    parser.add_argument("--options", default="{}", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.run_engine:
        return run_engine(args.model, args.workload, json.loads(args.options))

    import torch
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    with tempfile.TemporaryDirectory() as folder:
        model = args.model
        if model is None:
            from nanovllm import testing
            with torch.device("cuda" if torch.cuda.is_available() else "cpu"):  # 8B random weights: fast on a GPU
                model = testing.make_random_checkpoint(os.path.join(folder, f"{args.shape}-random"), "Qwen3ForCausalLM",
                                                       dtype=torch.bfloat16, **getattr(testing, SHAPES[args.shape]))
            torch.cuda.empty_cache()  # else this process keeps the memory (33 GB for 8B) from the engines' KV caches
        prompts, max_tokens = make_workload(args.num_seqs, args.input_len, args.output_len)
        workload_file = os.path.join(folder, "workload.json")
        with open(workload_file, "w") as f:
            json.dump({"prompts": prompts, "max_tokens": max_tokens}, f)
        options = dict(max_model_len=4096, tensor_parallel_size=args.tensor_parallel_size)
        if args.dtype:
            options["dtype"] = args.dtype
        summary = dict(device=gpu, num_seqs=args.num_seqs, expected_output_tokens=sum(max_tokens),
                       tensor_parallel_size=args.tensor_parallel_size)
        summary["nanovllm"] = child("nanovllm", model, workload_file, options)
        for backend in args.backend:
            name, _, path = backend.partition("=")
            label = f"nanovllm[{name}]"
            summary[label] = child(label, model, workload_file, {**options, "attention_backend": name},
                                   pythonpath=path or None)
        for tp in args.also_tp:
            label = f"nanovllm[tp={tp}]"
            other = summary[label] = child(label, model, workload_file, {**options, "tensor_parallel_size": tp})
            summary[f"ratio_to_tp={tp}"] = summary["nanovllm"]["throughput"] / other["throughput"]
        for baseline in args.baseline:
            label, _, path = baseline.partition("=")
            summary[label] = child(label, model, workload_file, options, pythonpath=path)
            summary[f"ratio_to_{label}"] = summary["nanovllm"]["throughput"] / summary[label]["throughput"]
        if args.upstream:
            summary["upstream"] = child("upstream", model, workload_file, options,
                                        pythonpath=os.path.abspath(args.upstream))
            summary["ratio"] = summary["nanovllm"]["throughput"] / summary["upstream"]["throughput"]
        if torch.cuda.is_available():
            summary["hbm_bound"] = hbm_bound(model, prompts, max_tokens, gpu, args.tensor_parallel_size)
            summary["fraction_of_bound"] = summary["hbm_bound"]["bound_seconds"] / summary["nanovllm"]["seconds"]
    baselines = [b.partition("=")[0] for b in args.baseline]
    for tp in args.also_tp:
        print(f"    ratio: {summary[f'ratio_to_tp={tp}']:.3f}x nanovllm at TP={tp}")
    for label in baselines:
        print(f"    ratio: {summary[f'ratio_to_{label}']:.3f}x {label}")
    if "ratio" in summary:
        print(f"    ratio: {summary['ratio']:.3f}x upstream")
    if "hbm_bound" in summary:
        b = summary["hbm_bound"]
        print(f"    bound: {b['bound_seconds']:.2f} s ({b['kv_read_tb']:.1f} TB KV + {b['weight_read_tb']:.1f} TB weights "
              f"at {b['hbm_tb_per_s']:.2f} TB/s per GPU, {b['prefill_tflop']:.0f} TFLOP prefill); nanovllm reaches "
              f"{summary['fraction_of_bound']:.0%} of it")
    print(f"SUMMARY {gpu}: " + json.dumps(summary))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=2)


if __name__ == "__main__":
    main()
