"""Offline throughput on upstream nano-vllm's bench.py workload: random prompts, ignore_eos."""
import random
import tempfile
import time

import torch

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
              seed: int = 0, **options) -> dict:
    """Time one generate() over the workload after a warm-up; returns tokens, seconds and tok/s."""
    from nanovllm import LLM
    with tempfile.TemporaryDirectory() as folder:
        model = model or random_checkpoint_for_platform(folder)
        llm = LLM(model, **options)
        vocab = llm.config.hf_config.vocab_size
        prompts, params = make_workload(num_seqs, input_len, output_len, seed, min(10000, vocab - 1))
        llm.generate(["Benchmark: "], SamplingParams(), use_tqdm=False)
        start = time.perf_counter()
        outputs = llm.generate(prompts, params, use_tqdm=False)
        seconds = time.perf_counter() - start
        llm.exit()
    tokens = sum(len(o["token_ids"]) for o in outputs)
    return dict(device=detect_platform().describe(), output_tokens=tokens, seconds=seconds,
                throughput=tokens / seconds)
