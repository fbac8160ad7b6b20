"""What low-rank experts lose, on a model trained by tools/train_moe_text_model.py: held-out perplexity and
next-token agreement with the full model, for PCA (decompose) and distillation (collect-calib, distill) at ranks
that keep about 75%, 50%, 25% and 5% of the expert parameters.

    python tools/eval_moe_svd_quality.py MODEL [--fractions 0.75 0.5 0.25 0.05] [--device cuda] [--json FILE]

Calibration prompts are windows of the training files; the held-out files (split.json) give 64 windows of 512
tokens. Hugging Face runs a copy of the checkpoint whose experts are the factors' products U V, which is what
the `svd` manager computes (the package's tests check that equality).
"""
import argparse
import json
import math
import os
import random
import shutil
import sys
import tempfile

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

sys.path.insert(0, os.path.dirname(__file__))
from train_moe_text_model import WINDOW, read, stdlib_split, token_stream  # noqa: E402

from nanovllm_moe_svd.collect_calib import main as collect_calib  # noqa: E402
from nanovllm_moe_svd.decompose import main as decompose  # noqa: E402
from nanovllm_moe_svd.distill import main as distill  # noqa: E402
from nanovllm_moe_svd.factors import PROJECTIONS, moe_layers, projection_rank, v_path  # noqa: E402


def expert_fraction(layer, rank: int) -> float:
    """The share of a layer's expert parameters that rank-``rank`` factors keep."""
    h, i, e = layer.hidden_size, layer.intermediate_size, layer.num_experts
    r13, rd = projection_rank(layer, "gate", rank), projection_rank(layer, "down", rank)
    return (2 * i * r13 + h * rd + e * (2 * r13 * h + rd * i)) / (3 * e * h * i)


def rank_for(layer, fraction: float) -> int:
    return min(range(1, max(layer.hidden_size, layer.intermediate_size) + 1),
               key=lambda r: abs(expert_fraction(layer, r) - fraction))


def with_factors(model_path: str, folder: str, layers, dest: str) -> str:
    """A copy of the checkpoint whose expert weights are U V from ``folder``."""
    tensors = load_file(os.path.join(model_path, "model.safetensors"))
    with safe_open(os.path.join(folder, "U_matrices.safetensors"), "pt", "cpu") as bases:
        for layer in layers:
            for expert in range(layer.num_experts):
                v = load_file(v_path(folder, layer.index, expert))
                for p in PROJECTIONS:
                    basis = bases.get_tensor(f"layer_{layer.index}.{p}").float()
                    tensors[layer.tensor_name(expert, p)] = (basis @ v[p].float()).contiguous()
    os.makedirs(dest, exist_ok=True)
    for name in os.listdir(model_path):
        if name.endswith(".json") and name != "split.json":
            shutil.copy(os.path.join(model_path, name), dest)
    save_file(tensors, os.path.join(dest, "model.safetensors"), metadata={"format": "pt"})
    return dest


@torch.no_grad()
def evaluate(model, windows: torch.Tensor, reference: torch.Tensor | None):
    """(perplexity, agreement of each next-token argmax with ``reference``'s, those argmaxes)."""
    logits = torch.cat([model(input_ids=w.unsqueeze(0)).logits[0] for w in windows]).float()
    targets = windows[:, 1:].flatten()
    logits_shifted = logits.view(windows.size(0), WINDOW, -1)[:, :-1].flatten(0, 1)
    loss = torch.nn.functional.cross_entropy(logits_shifted, targets)
    top = logits_shifted.argmax(-1)
    agreement = (top == reference).float().mean().item() if reference is not None else 1.0
    return math.exp(loss.item()), agreement, top


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model")
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.75, 0.5, 0.25, 0.05])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--calib-prompts", type=int, default=64)
    parser.add_argument("--json")
    args = parser.parse_args()
    layers = moe_layers(args.model)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    with open(os.path.join(args.model, "split.json")) as f:
        held_out = json.load(f)["held_out"]
    test = token_stream(tokenizer, read(held_out))
    windows = test[:test.numel() // WINDOW * WINDOW].view(-1, WINDOW)[:64].to(args.device)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).to(args.device).eval()
    full_ppl, _, reference = evaluate(model, windows, None)
    print(f"full model: held-out perplexity {full_ppl:.2f}", flush=True)
    rng = random.Random(0)
    train_texts = [t for t in read(stdlib_split()[0]) if len(t) > 2000]
    prompts = []
    for text in rng.sample(train_texts, args.calib_prompts):
        start = rng.randrange(len(text) - 1500)
        prompts.append(text[start:start + 1500])
    rows = []
    with tempfile.TemporaryDirectory() as work:
        prompt_file, calib = os.path.join(work, "prompts.json"), os.path.join(work, "calib.safetensors")
        with open(prompt_file, "w") as f:
            json.dump(prompts, f)
        collect_calib(["--model-path", args.model, "--out", calib, "--prompts", prompt_file, "--cap-per-group", "2048",
                       "--max-new-tokens", "32"])
        for fraction in args.fractions:
            rank = rank_for(layers[0], fraction)
            row = dict(target=fraction, rank=rank, kept=expert_fraction(layers[0], rank))
            for method in ("pca", "distill"):
                folder = os.path.join(work, f"{method}-{rank}")
                common = ["--model-path", args.model, "--rank", str(rank), "--device", args.device, "--dtype",
                          "float32", "--output-dir", folder]
                if method == "pca":
                    decompose(common)
                else:
                    distill(common + ["--calib-path", calib])
                dense = with_factors(args.model, folder, layers, os.path.join(work, f"{method}-{rank}-dense"))
                model = AutoModelForCausalLM.from_pretrained(dense, dtype=torch.float32).to(args.device).eval()
                ppl, agreement, _ = evaluate(model, windows, reference)
                row |= {f"{method}_perplexity": ppl, f"{method}_agreement": agreement}
            rows.append(row)
            print(f"rank {rank} ({row['kept']:.0%} of expert parameters): PCA perplexity {row['pca_perplexity']:.2f}, "
                  f"agreement {row['pca_agreement']:.1%}; distill {row['distill_perplexity']:.2f}, "
                  f"{row['distill_agreement']:.1%}", flush=True)
    summary = dict(full_perplexity=full_ppl, rows=rows)
    print("RESULT " + json.dumps(summary))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=1)


if __name__ == "__main__":
    main()
