"""Retrieval accuracy of a model trained on nanovllm.testing.RetrievalTask under KV retention: full KV, SnapKV and
`recent` at the same budget, for several prompt lengths and budgets, all through nanovllm.

    python tools/eval_kv_retention.py MODEL [--lengths 256 512 1024] [--ratios 2 4 8] [--num-prompts 200]

A budget is the prompt length divided by a ratio (4: 4x compression). Prints one table and a JSON line.
"""
import argparse
import json

from nanovllm import LLM
from nanovllm.testing import RetrievalTask, retrieval_accuracy


def accuracy(model, length, num_prompts, **options):
    llm = LLM(model, attention_backend="mps", max_model_len=length + RetrievalTask().value_len, kvcache_block_size=16,
              max_num_batched_tokens=max(8192, length), max_num_seqs=64, enforce_eager=True, kv_cache_memory_gib=4,
              **options)
    result = retrieval_accuracy(llm, RetrievalTask(), length, num_prompts, seed=length)
    llm.exit()
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model")
    parser.add_argument("--lengths", type=int, nargs="+", default=[256, 512, 1024, 2048])
    parser.add_argument("--ratios", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--num-prompts", type=int, default=200)
    parser.add_argument("--window", type=int, default=16, help="snapkv_attn_sample_queries")
    parser.add_argument("--kernel", type=int, default=7, help="snapkv_pool_kernel")
    args = parser.parse_args()
    rows = []
    print(f"{'length':>6} {'budget':>6} {'full':>6} {'snapkv':>7} {'recent':>7}")
    for length in args.lengths:
        full = accuracy(args.model, length, args.num_prompts)
        for ratio in args.ratios:
            budget = length // ratio
            snapkv = accuracy(args.model, length, args.num_prompts, enable_snapkv=True, snapkv_limit=budget,
                              snapkv_attn_sample_queries=min(args.window, budget), snapkv_pool_kernel=args.kernel)
            recent = accuracy(args.model, length, args.num_prompts, kv_retention="recent", kv_keep_first=4,
                              kv_keep_last=budget - 4)
            rows.append(dict(length=length, budget=budget, full=full, snapkv=snapkv, recent=recent))
            print(f"{length:>6} {budget:>6} {full:>6.3f} {snapkv:>7.3f} {recent:>7.3f}", flush=True)
    print("RESULT " + json.dumps(dict(model=args.model, window=args.window, kernel=args.kernel,
                                      num_prompts=args.num_prompts, rows=rows)))


if __name__ == "__main__":
    main()
