"""collect-calib: run the full model (dense experts) on calibration prompts and keep, per MoE layer and expert, up
to --cap-per-group of the inputs routed to it, for distill.

    collect-calib --model-path MODEL --out calib.safetensors [--cap-per-group 512] [--num-prompts 32]
                  [--max-new-tokens 64] [--temperature 0.8] [--prompts FILE]

Prompts come from --prompts (one per line, or a .json list of strings for prompts of several lines) or a
built-in set. Inputs of prompt and generated tokens alike are
kept, in the model's dtype; the file records which model they came from.
"""
import argparse
import json
import os

import torch
from safetensors.torch import save_file

from nanovllm_moe_svd.factors import fingerprint, layer_index, moe_layers, tool

BUILTIN_PROMPTS = [
    "Explain how a hash table handles collisions.", "Write a short poem about the sea at night.",
    "What causes the seasons on Earth?", "def quicksort(items):", "Translate to French: The weather is nice today.",
    "List three uses of copper and why.", "The history of the printing press begins", "import numpy as np\n\n",
    "Summarise the plot of Hamlet in two sentences.", "How do vaccines train the immune system?",
    "Write a SQL query that counts orders per customer.", "Once upon a time, in a village by the mountains,",
    "What is the derivative of x^3 * sin(x)?", "Give advice to someone starting to learn the piano.",
    "class Stack:\n    def __init__(self):", "Describe the water cycle for a ten-year-old.",
    "Why is the sky blue?", "Compare TCP and UDP.", "Write a limerick about a cat who codes.",
    "What are the main causes of inflation?", "<html>\n<head>\n<title>", "Explain recursion with an example.",
    "Plan a three-day trip to Kyoto.", "The mitochondria is the powerhouse of the cell because",
    "Prove that the square root of 2 is irrational.", "Write a haiku about autumn leaves.",
    "How does a transformer language model work?", "SELECT name FROM users WHERE",
    "What should I consider when buying a used car?", "Describe the taste of a ripe mango.",
    "In 1969, Apollo 11", "Tips for writing clear documentation:",
]


@tool
def main(argv=None):
    parser = argparse.ArgumentParser(prog="collect-calib", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-path", required=True)
    parser.add_argument("--out", required=True, help="the calibration file to write (safetensors)")
    parser.add_argument("--cap-per-group", type=int, default=512, help="inputs kept per layer and expert")
    parser.add_argument("--num-prompts", type=int, help="use the first N prompts (default all)")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.8)
    parser.add_argument("--prompts", help="a text file with one prompt per line, or a .json list of prompts "
                                          "(default: a built-in set)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    args = parser.parse_args(argv)
    if args.cap_per_group < 1:
        raise ValueError(f"--cap-per-group {args.cap_per_group} must be at least 1")
    if os.path.exists(args.out) and not args.overwrite:
        raise FileExistsError(f"{args.out!r} exists; pass --overwrite to replace it")
    prompts = BUILTIN_PROMPTS
    if args.prompts:
        with open(args.prompts) as f:
            if args.prompts.endswith(".json"):
                prompts = json.load(f)
            else:
                prompts = [line.rstrip("\n") for line in f if line.strip()]
    prompts = prompts[:args.num_prompts]
    layers = moe_layers(args.model_path)
    from nanovllm import LLM, SamplingParams
    from nanovllm.layers.moe import SparseMoE
    # the dense experts, whatever factors exist; eager, so that their forward runs in Python
    llm = LLM(args.model_path, expert_manager="resident", enforce_eager=True)
    kept: dict[str, list[torch.Tensor]] = {}
    counts: dict[str, int] = {}

    def capturing(forward, layer):
        def capture(x, topk_weights, topk_ids):
            for expert in topk_ids.unique().tolist():
                key = f"layer_{layer}_expert_{expert}"
                room = args.cap_per_group - counts.get(key, 0)
                if room > 0:
                    rows = x[(topk_ids == expert).any(dim=1)][:room]
                    kept.setdefault(key, []).append(rows.cpu())
                    counts[key] = counts.get(key, 0) + rows.size(0)
            return forward(x, topk_weights, topk_ids)
        return capture
    for name, moe in llm.model_runner.model.named_modules():
        if isinstance(moe, SparseMoE):
            moe.experts.forward = capturing(moe.experts.forward, layer_index(name))
    llm.generate(prompts, SamplingParams(temperature=args.temperature, max_tokens=args.max_new_tokens, seed=0))
    llm.exit()
    metadata = dict(fingerprint=fingerprint(args.model_path, layers), prompts=str(len(prompts)),
                    cap_per_group=str(args.cap_per_group))
    save_file({key: torch.cat(rows).contiguous() for key, rows in kept.items()}, args.out, metadata=metadata)
    print(f"kept {sum(counts.values())} inputs of {len(counts)} (layer, expert) groups from {len(prompts)} prompts "
          f"in {args.out}: " + json.dumps({"min": min(counts.values()), "max": max(counts.values())}))


if __name__ == "__main__":
    main()
