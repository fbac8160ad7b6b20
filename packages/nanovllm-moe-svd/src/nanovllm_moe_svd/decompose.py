"""decompose: low-rank experts by PCA over each layer's experts, no data needed.

    decompose --model-path MODEL --rank R [--dtype bfloat16] [--device cuda] [--output-dir MODEL/svd_experts]

Streams the checkpoint one MoE layer and projection at a time, so host memory holds one layer's experts.
"""
import argparse
import os

import torch
from safetensors.torch import save_file
from tqdm.auto import tqdm

from nanovllm_moe_svd.factors import (FOLDER, PROJECTIONS, CheckpointReader, check_rank, moe_layers,
                                      prepare_output, projection_rank, tool, v_path,
                                      write_metadata)
from nanovllm_moe_svd.linalg import pca_factors

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def common_arguments(parser: argparse.ArgumentParser):
    parser.add_argument("--model-path", required=True, help="a local Hugging Face MoE checkpoint folder")
    parser.add_argument("--rank", type=int, required=True, help="rank of every layer's shared bases")
    parser.add_argument("--dtype", default="bfloat16", choices=DTYPES, help="dtype of the stored factors")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="where the decomposition computes (float32)")
    parser.add_argument("--output-dir", help=f"where the factors go (default MODEL/{FOLDER})")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing, non-empty output folder")


def write_layer(output_dir: str, layer, factors: dict, dtype: torch.dtype) -> dict:
    """Each expert's V file; returns the layer's bases, keyed as in U_matrices.safetensors."""
    for expert in range(layer.num_experts):
        save_file({p: factors[p][1][expert].to(dtype).contiguous().cpu() for p in PROJECTIONS},
                  v_path(output_dir, layer.index, expert))
    return {f"layer_{layer.index}.{p}": factors[p][0].to(dtype).contiguous().cpu() for p in PROJECTIONS}


@tool
def main(argv=None):
    parser = argparse.ArgumentParser(prog="decompose", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    common_arguments(parser)
    args = parser.parse_args(argv)
    layers = moe_layers(args.model_path)
    check_rank(args.rank, layers)
    output_dir = args.output_dir or os.path.join(args.model_path, FOLDER)
    prepare_output(output_dir, args.overwrite)
    reader, bases = CheckpointReader(args.model_path), {}
    for layer in tqdm(layers, desc="decompose", unit="layer"):
        factors = {p: pca_factors(reader.experts(layer, p).to(args.device, torch.float32),
                                  projection_rank(layer, p, args.rank)) for p in PROJECTIONS}
        bases |= write_layer(output_dir, layer, factors, DTYPES[args.dtype])
    save_file(bases, os.path.join(output_dir, "U_matrices.safetensors"))
    write_metadata(output_dir, args.rank, args.dtype, "pca", {}, layers)
    print(f"wrote rank-{args.rank} PCA factors of {len(layers)} MoE layers to {output_dir}")


if __name__ == "__main__":
    main()
