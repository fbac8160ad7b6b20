"""Data-parallel scaling on upstream nano-vllm's bench workload: one in-process LLM beside the Ray Data path
(nanovllm.ray_batch) with N workers of one GPU each, in one command.

    python tools/bench_ray_batch.py [--num-workers 2] [--model PATH] [--num-seqs 256] [--json]

Both sides run the same workload (256 sequences, input and output lengths uniform in 100..1024 from seed 0,
temperature 0.6, ignore_eos; on a machine without CUDA a small one, for a smoke check) on the same checkpoint
(Qwen3-0.6B shape, random weights made locally unless --model is given; a small shape without CUDA). Each is timed
on generation alone, after its engines are built and warmed up (the workers each take one batch of
num_seqs / num_workers rows once all are ready), and end to end, from starting the engines' processes to the last
output row (written as Parquet on the Ray side; the cluster's own start is not counted). The in-process engine
runs in a child process that ends before the workers start, so every GPU is free for them. Ray: the cluster in
RAY_ADDRESS, else a local one.
"""
import argparse
import concurrent.futures
import json
import math
import multiprocessing
import os
import tempfile
import time

# Workers on this host run this interpreter; under `uv run`, Ray would build each a copy of the uv project.
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")


def in_process(model: str, prompts: list[list[int]], max_tokens: list[int], options: dict) -> dict:
    """In a child process: build one LLM, warm it up and time the workload."""
    from nanovllm import LLM, SamplingParams
    from nanovllm.platform import detect_platform
    llm = LLM(model, **options)
    llm.generate(["Benchmark: "], SamplingParams(), use_tqdm=False)
    params = [SamplingParams(temperature=0.6, ignore_eos=True, max_tokens=n) for n in max_tokens]
    generate_start = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    seconds = time.perf_counter() - generate_start
    llm.exit()
    return dict(device=detect_platform().describe(), output_tokens=sum(len(o["token_ids"]) for o in outputs),
                seconds=seconds)


def on_ray(model: str, prompts: list[list[int]], max_tokens: list[int], options: dict, num_workers: int) -> dict:
    """The workload as rows through LLMPredictor.map_dataset, each worker warmed up before its batch."""
    import pyarrow.parquet as pq
    import ray

    from nanovllm.ray_batch import LLMPredictor

    class TimedPredictor(LLMPredictor):
        """Warms its engine up as the in-process one is; each row records when its batch's call ran."""

        def __init__(self, model: str, **kwargs):
            super().__init__(model, **kwargs)
            from nanovllm import SamplingParams
            self.llm.generate(["Benchmark: "], SamplingParams(), use_tqdm=False)

        def __call__(self, batch):
            start = time.time()  # wall clock: comparable across the workers' processes
            output = super().__call__(batch)
            return (output.append_column("call_start", [[start] * output.num_rows])
                    .append_column("call_end", [[time.time()] * output.num_rows]))

    ray.init()
    # every worker ready before the first batch goes out: one batch each, generated side by side
    ray.data.DataContext.get_current().wait_for_min_actors_s = 1800
    rows = [{"prompt_token_ids": p, "sampling_params": {"max_tokens": n}} for p, n in zip(prompts, max_tokens)]
    with tempfile.TemporaryDirectory() as folder:
        start = time.perf_counter()
        ds = TimedPredictor.map_dataset(ray.data.from_items(rows), model, num_workers=num_workers,
                                        batch_size=math.ceil(len(rows) / num_workers),
                                        sampling_params=dict(temperature=0.6, ignore_eos=True), **options)
        ds.write_parquet(folder)
        total = time.perf_counter() - start
        table = pq.read_table(folder, columns=["num_output_tokens", "call_start", "call_end", "error"])
    assert table["error"].null_count == table.num_rows, "rows failed: " + str(table["error"].unique())
    seconds = max(table["call_end"].to_pylist()) - min(table["call_start"].to_pylist())
    return dict(output_tokens=sum(table["num_output_tokens"].to_pylist()), seconds=seconds, total_seconds=total,
                num_workers=num_workers, cluster_gpus=ray.cluster_resources().get("GPU", 0))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-workers", type=int, default=2, help="Ray workers, one GPU each where there are GPUs")
    parser.add_argument("--model", help="checkpoint folder (default: random weights made locally)")
    parser.add_argument("--num-seqs", type=int, help="sequences (default: 256 with CUDA, 16 without)")
    parser.add_argument("--input-len", type=int, nargs=2, metavar=("MIN", "MAX"))
    parser.add_argument("--output-len", type=int, nargs=2, metavar=("MIN", "MAX"))
    parser.add_argument("--json", action="store_true", help="also print the summary as one JSON line")
    args = parser.parse_args()

    from nanovllm.cli.bench import default_workload_shape, make_workload, random_checkpoint_for_platform
    shape = default_workload_shape()  # as `nanovllm bench`: upstream's with CUDA, a small one without
    num_seqs = args.num_seqs or shape["num_seqs"]
    input_len, output_len = tuple(args.input_len or shape["input_len"]), tuple(args.output_len or shape["output_len"])
    options = dict(max_model_len=4096)  # as tools/bench_throughput.py
    with tempfile.TemporaryDirectory() as folder:
        model = args.model or random_checkpoint_for_platform(folder)
        prompts, params = make_workload(num_seqs, input_len, output_len)
        max_tokens = [p.max_tokens for p in params]
        spawn = multiprocessing.get_context("spawn")
        start = time.perf_counter()  # end to end as a worker's: the process, its imports, the engine, the rows
        with concurrent.futures.ProcessPoolExecutor(1, mp_context=spawn) as pool:
            single = pool.submit(in_process, model, prompts, max_tokens, options).result()
        single["total_seconds"] = time.perf_counter() - start
        ray_side = on_ray(model, prompts, max_tokens, options, args.num_workers)
    summary = dict(device=single["device"], model=args.model or "random weights", num_seqs=num_seqs,
                   input_len=list(input_len), output_len=list(output_len), workload_seed=0, engine_options=options,
                   in_process=single, ray=ray_side)
    for side in (single, ray_side):
        side["throughput"] = side["output_tokens"] / side["seconds"]
        side["total_throughput"] = side["output_tokens"] / side["total_seconds"]
    summary["scaling"] = ray_side["throughput"] / single["throughput"]
    summary["total_scaling"] = ray_side["total_throughput"] / single["total_throughput"]
    print(f"Device: {single['device']}; workload: {num_seqs} sequences, prompts of {input_len[0]}..{input_len[1]} "
          f"and outputs of {output_len[0]}..{output_len[1]} tokens ({sum(max_tokens)} output tokens)")
    for label, side in (("in-process LLM", single), (f"Ray, {args.num_workers} workers", ray_side)):
        print(f"{label:>16}: {side['output_tokens']} tok, generation {side['seconds']:.2f} s = "
              f"{side['throughput']:.0f} tok/s; end to end {side['total_seconds']:.2f} s = "
              f"{side['total_throughput']:.0f} tok/s")
    print(f"         scaling: {summary['scaling']:.2f}x on generation, {summary['total_scaling']:.2f}x end to end "
          f"({args.num_workers} workers)")
    if args.json:
        print(json.dumps(summary))


if __name__ == "__main__":
    main()
