"""Offline throughput on upstream nano-vllm's bench.py workload: random prompts, ignore_eos."""
import random
import statistics
import tempfile
import time

import torch
from tqdm.auto import tqdm

from nanovllm.platform import detect_platform
from nanovllm.sampling_params import SamplingParams


def make_workload(num_seqs: int, input_len: tuple[int, int], output_len: tuple[int, int], seed: int = 0,
                  max_token_id: int = 10000) -> tuple[list[list[int]], list[SamplingParams]]:
    """The same random draws, in the same order, as upstream's bench.py (256 x 100..1024 -> 133,966 tokens)."""
    random.seed(seed)
    prompts = [[random.randint(0, max_token_id) for _ in range(random.randint(*input_len))] for _ in range(num_seqs)]
    params = [SamplingParams(temperature=0.6, ignore_eos=True, max_tokens=random.randint(*output_len))
              for _ in range(num_seqs)]
    return prompts, params


def default_workload_shape() -> dict:
    """Upstream's workload on a GPU; a small one on CPU that finishes in about a minute on 2 cores."""
    if detect_platform().device_type == "cuda":
        return dict(num_seqs=256, input_len=(100, 1024), output_len=(100, 1024))
    return dict(num_seqs=16, input_len=(16, 128), output_len=(16, 128))


def random_checkpoint_for_platform(folder: str) -> str:
    from nanovllm.testing import QWEN3_0_6B, SMALL, make_random_checkpoint
    shape = QWEN3_0_6B if detect_platform().device_type == "cuda" else SMALL
    return make_random_checkpoint(folder, "Qwen3ForCausalLM", dtype=torch.bfloat16, **shape)


def run_bench(model: str | None, num_seqs: int, input_len: tuple[int, int], output_len: tuple[int, int],
              seed: int = 0, repeats: int = 3, **options) -> dict:
    """Time ``repeats`` generate() calls over the workload after an untimed warm-up one; returns the workload,
    each run's seconds, and the median throughput with its spread."""
    from nanovllm import LLM
    with tempfile.TemporaryDirectory() as folder:
        with LLM(model or random_checkpoint_for_platform(folder), **options) as llm:
            vocab = llm.config.hf_config.vocab_size
            prompts, params = make_workload(num_seqs, input_len, output_len, seed, min(10000, vocab - 1))
            tokens = sum(p.max_tokens for p in params)
            print(f"Workload: {num_seqs} sequences, prompts of {input_len[0]}..{input_len[1]} and outputs of "
                  f"{output_len[0]}..{output_len[1]} tokens (seed {seed}: {sum(map(len, prompts))} prompt and "
                  f"{tokens} output tokens), temperature 0.6, ignore_eos; a warm-up and {repeats} timed runs",
                  flush=True)
            seconds = []
            for _ in tqdm(range(1 + repeats), desc="bench runs", dynamic_ncols=True):
                start = time.perf_counter()
                llm.generate(prompts, params, use_tqdm=False)
                seconds.append(time.perf_counter() - start)
    timed = sorted(seconds[1:])
    median = statistics.median(timed)
    return dict(device=detect_platform().describe(), model=model or "random weights",
                num_seqs=num_seqs, input_len=list(input_len), output_len=list(output_len), workload_seed=seed,
                repeats=repeats, engine_options=options, output_tokens=tokens, warmup_seconds=seconds[0],
                seconds=timed, median_seconds=median, throughput=tokens / median,
                throughput_min=tokens / timed[-1], throughput_max=tokens / timed[0])
