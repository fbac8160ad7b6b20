"""Train a small Llama-shaped model on nanovllm.testing.RetrievalTask, to judge what KV-retention policies keep.

    python tools/train_retrieval_model.py --output DIR [--seconds 240] [--max-len 1024]

Key-value pairs are spread through filler, four questions follow; the loss is on the answers only. Prompt
lengths are drawn from [64, max-len] (short ones first). Writes a normal checkpoint (fp32 safetensors, config,
tokenizer) that nanovllm and transformers load, with retrieval_task.json beside it.
"""
import argparse
import dataclasses
import json
import math
import os
import random
import time

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from nanovllm.testing import RetrievalTask, make_tokenizer

SHAPE = dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=2, head_dim=32, vocab_size=512, max_position_embeddings=4096,
             tie_word_embeddings=True, rms_norm_eps=1e-6, rope_theta=10000.0)


def batch(task, rng, batch_size, length, device):
    """Token ids [batch, length + 10] and labels that score only the four answers."""
    rows, labels = [], []
    for _ in range(batch_size):
        prompt, continuation = task.sample(length, rng, num_questions=4)
        tokens = prompt + continuation
        answers = {len(prompt) + 3 * i for i in range(4)}
        rows.append(tokens)
        labels.append([t if i in answers else -100 for i, t in enumerate(tokens)])
    return torch.tensor(rows, device=device), torch.tensor(labels, device=device)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", required=True)
    parser.add_argument("--seconds", type=float, default=240, help="training time budget")
    parser.add_argument("--max-len", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    task = RetrievalTask()
    config = AutoConfig.for_model("llama", architectures=["LlamaForCausalLM"], eos_token_id=0, bos_token_id=task.bos,
                                  **SHAPE)
    model = AutoModelForCausalLM.from_config(config).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    start, step, correct, seen = time.perf_counter(), 0, 0, 0
    while (elapsed := time.perf_counter() - start) < args.seconds:
        progress = elapsed / args.seconds
        lr = args.lr * min(1.0, step / 200) * 0.5 * (1 + math.cos(math.pi * progress))
        for group in optimizer.param_groups:
            group["lr"] = lr
        longest = int(64 + (args.max_len - 64) * min(1.0, 2 * progress))  # short prompts first
        ids, labels = batch(task, rng, args.batch_size, rng.randint(64, longest), device)
        with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
            out = model(input_ids=ids, labels=labels)
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scored = labels[:, 1:] != -100
        correct += (out.logits[:, :-1].argmax(-1)[scored] == labels[:, 1:][scored]).sum().item()
        seen += scored.sum().item()
        step += 1
        if step % 200 == 0:
            print(f"step {step} ({elapsed:.0f} s, lengths up to {longest}): loss {out.loss.item():.3f}, "
                  f"answer accuracy {correct / seen:.3f}, lr {lr:.2e}", flush=True)
            correct = seen = 0
    model.to(torch.float32).save_pretrained(args.output)
    make_tokenizer().save_pretrained(args.output)
    with open(os.path.join(args.output, "retrieval_task.json"), "w") as f:
        json.dump({**dataclasses.asdict(task), "trained_lengths": [64, args.max_len], "steps": step}, f, indent=1)
    print(f"saved {args.output} after {step} steps")


if __name__ == "__main__":
    main()
