"""Train a small Llama-shaped model on nanovllm.testing.RetrievalTask, to judge what KV-retention policies keep.

    python tools/train_retrieval_model.py --output DIR [--seconds 240] [--max-len 1024]

Needles are spread through filler and every one is asked about; the loss is on the values' digits only. Prompt
lengths grow from a few tokens to max-len over the first 60% of the time (the question heads form on short
prompts first), then are drawn from the whole range. Writes a normal checkpoint (fp32 safetensors, config,
tokenizer) that nanovllm and transformers load, with retrieval_task.json beside it.
"""
import argparse
import dataclasses
import json
import math
import os
import time

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from nanovllm.testing import RetrievalTask, make_tokenizer

SHAPE = dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=2, head_dim=32, vocab_size=512, max_position_embeddings=4096,
             tie_word_embeddings=True, rms_norm_eps=1e-6, rope_theta=10000.0)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", required=True)
    parser.add_argument("--seconds", type=float, default=240, help="training time budget")
    parser.add_argument("--max-len", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(args.seed)
    generator = torch.Generator(device).manual_seed(args.seed)
    task = RetrievalTask()
    config = AutoConfig.for_model("llama", architectures=["LlamaForCausalLM"], eos_token_id=0, bos_token_id=task.bos,
                                  **SHAPE)
    model = AutoModelForCausalLM.from_config(config).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    questions = task.num_needles
    start, step, correct, seen = time.perf_counter(), 0, torch.zeros((), device=device), 0
    while (elapsed := time.perf_counter() - start) < args.seconds:
        progress = elapsed / args.seconds
        lr = args.lr * min(1.0, step / 100) * 0.5 * (1 + math.cos(math.pi * progress))
        for group in optimizer.param_groups:
            group["lr"] = lr
        longest = int(task.min_length + (args.max_len - task.min_length) * min(1.0, progress / 0.6))
        length = int(torch.randint(task.min_length, longest + 1, (1,), generator=generator, device=device))
        tokens, values = task.batch(args.batch_size, length, generator, questions)
        keys_at = length - 1 + (task.value_len + 2) * torch.arange(questions, device=device)
        predicting = keys_at.unsqueeze(1) + torch.arange(task.value_len, device=device)  # the key, then each digit
        with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
            logits = model(input_ids=tokens).logits[:, predicting].float()  # [batch, questions, value_len, vocab]
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 2), values.flatten())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        correct += (logits.argmax(-1) == values).all(-1).sum()  # whole values; summed on the device: no sync
        seen += values.shape[0] * values.shape[1]
        step += 1
        if step % 500 == 0:
            print(f"step {step} ({elapsed:.0f} s, lengths up to {longest}): loss {loss.item():.3f}, "
                  f"value accuracy {correct.item() / seen:.3f}, lr {lr:.2e}", flush=True)
            correct.zero_()
            seen = 0
    model.to(torch.float32).save_pretrained(args.output)
    make_tokenizer().save_pretrained(args.output)
    with open(os.path.join(args.output, "retrieval_task.json"), "w") as f:
        json.dump({**dataclasses.asdict(task), "max_trained_length": args.max_len, "steps": step,
                   "seconds": args.seconds}, f, indent=1)
    print(f"saved {args.output} after {step} steps")


if __name__ == "__main__":
    main()
