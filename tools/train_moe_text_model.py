"""Train a small Mixtral on the Python standard library's sources, to measure what low-rank experts lose.

    python tools/train_moe_text_model.py --output DIR [--seconds 240]

Files of the standard library (tests, idlelib and site-packages left out) are split by a hash of their path: one in
ten is held out. A byte-level BPE tokenizer is trained on the training files, then the model (4 layers, 8 experts
of intermediate size 512, top 2, hidden 256) on random 512-token windows of them, with Mixtral's router balancing
loss. Writes a normal checkpoint (bf16), its tokenizer and split.json (the held-out files), and prints the
held-out loss.
"""
import argparse
import glob
import json
import math
import os
import sysconfig
import time
import zlib

import torch
from transformers import MixtralConfig, MixtralForCausalLM, PreTrainedTokenizerFast

SHAPE = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=2, head_dim=64, num_local_experts=8, num_experts_per_tok=2, vocab_size=4096,
             max_position_embeddings=1024, rms_norm_eps=1e-6, router_aux_loss_coef=0.02, tie_word_embeddings=False)
WINDOW = 512


def stdlib_split() -> tuple[list[str], list[str]]:
    """(training files, held-out files), paths relative to the standard library."""
    root = sysconfig.get_paths()["stdlib"]
    files = sorted(os.path.relpath(f, root) for f in glob.glob(os.path.join(root, "**", "*.py"), recursive=True)
                   if not any(part in f for part in ("site-packages", f"{os.sep}test", "idlelib")))
    held_out = [f for f in files if zlib.crc32(f.encode()) % 10 == 0]
    return [f for f in files if f not in held_out], held_out


def read(files: list[str]) -> list[str]:
    root = sysconfig.get_paths()["stdlib"]
    texts = []
    for f in files:
        with open(os.path.join(root, f), encoding="utf-8", errors="replace") as handle:
            texts.append(handle.read())
    return texts


def train_tokenizer(texts: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|endoftext|>", pad_token="<|endoftext|>")


def token_stream(tokenizer, texts: list[str]) -> torch.Tensor:
    """All files' tokens, each file followed by the end-of-text token."""
    ids = []
    for encoded in tokenizer(texts)["input_ids"]:
        ids += encoded + [tokenizer.eos_token_id]
    return torch.tensor(ids)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", required=True)
    parser.add_argument("--seconds", type=float, default=240)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=2e-3)
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    train_files, held_out = stdlib_split()
    train_texts = read(train_files)
    tokenizer = train_tokenizer(train_texts, SHAPE["vocab_size"])
    train, test = token_stream(tokenizer, train_texts).to(device), token_stream(tokenizer, read(held_out)).to(device)
    print(f"{len(train_files)} training files ({train.numel()} tokens), {len(held_out)} held out ({test.numel()})",
          flush=True)
    config = MixtralConfig(**SHAPE, architectures=["MixtralForCausalLM"], eos_token_id=tokenizer.eos_token_id,
                           output_router_logits=True)
    model = MixtralForCausalLM(config).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.1, betas=(0.9, 0.95))
    generator = torch.Generator(device).manual_seed(0)
    start, step = time.perf_counter(), 0
    while (elapsed := time.perf_counter() - start) < args.seconds:
        lr = args.lr * min(1.0, step / 200) * 0.5 * (1 + math.cos(math.pi * elapsed / args.seconds))
        for group in optimizer.param_groups:
            group["lr"] = lr
        starts = torch.randint(train.numel() - WINDOW, (args.batch_size, 1), generator=generator, device=device)
        batch = train[starts + torch.arange(WINDOW, device=device)]
        with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
            loss = model(input_ids=batch, labels=batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        step += 1
        if step % 500 == 0:
            print(f"step {step} ({elapsed:.0f} s): loss {loss.item():.3f} (with the balancing loss), lr {lr:.2e}",
                  flush=True)
    model.config.output_router_logits = False
    model.eval()
    with torch.no_grad(), torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
        windows = test[:test.numel() // WINDOW * WINDOW].view(-1, WINDOW)[:64]
        held_loss = model(input_ids=windows, labels=windows).loss.item()
    print(f"{step} steps; held-out loss {held_loss:.3f} (perplexity {math.exp(held_loss):.1f})", flush=True)
    model.to(torch.bfloat16).save_pretrained(args.output)  # as real MoE checkpoints are (fa2 runs no float32)
    tokenizer.save_pretrained(args.output)
    with open(os.path.join(args.output, "split.json"), "w") as f:
        json.dump(dict(held_out=held_out, steps=step, seconds=args.seconds), f)


if __name__ == "__main__":
    main()
