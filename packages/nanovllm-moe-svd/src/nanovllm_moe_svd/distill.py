"""distill: activation-aware low-rank experts from calibration inputs (collect-calib).

    distill --model-path MODEL --calib-path calib.safetensors --rank R [--dtype bfloat16] [--ridge 0.01]
            [--device cuda] [--chunk 4096] [--chunk-w2 1024] [--pca-oversample 32] [--output-dir MODEL/svd_experts]

Per layer and projection the shared basis U spans what the experts output on their own calibration inputs (the
leading eigenvectors of sum_e W_e C_e W_e^T, C_e the inputs' second moments), rather than their weights; each
expert's V is then the ridge regression of its outputs on its inputs through U: V = U^T W C (C + lambda)^-1.
The down projection's inputs are the dense experts' activations silu(gate x) * up x. An expert the calibration
never reached gets PCA's treatment. Streams the checkpoint one layer at a time.
"""
import argparse
import os

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from nanovllm_moe_svd.decompose import DTYPES, common_arguments, write_layer
from nanovllm_moe_svd.factors import (FOLDER, CheckpointReader, check_rank, fingerprint, moe_layers, prepare_output,
                                      projection_rank, tool, write_metadata)
from nanovllm_moe_svd.linalg import ridge_factor, top_eigenvectors


def moments(rows: torch.Tensor, chunk: int, transform=None) -> torch.Tensor:
    """sum over rows of y y^T for y = transform(row) (the row itself by default), ``chunk`` rows at a time."""
    total = None
    for start in range(0, rows.size(0), chunk):
        y = rows[start:start + chunk]
        y = transform(y) if transform is not None else y
        total = y.t() @ y if total is None else total + y.t() @ y
    return total


def distill_projection(weights: torch.Tensor, inputs: list, rank: int, ridge: float, chunk: int,
                       oversample: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(U [out, rank], V [E, rank, in]) for one projection: weights [E, out, in]; inputs[e] an expert's inputs
    [n, in] (float32, on the device) or None."""
    # an unreached expert counts like an average one whose inputs were isotropic: PCA's view of it
    seen = [x.pow(2).sum() / x.size(1) for x in inputs if x is not None]
    isotropic = sum(seen) / len(seen) if seen else 1.0
    output_moments = sum(moments(x, chunk, lambda rows, w=w: rows @ w.t()) if x is not None
                         else isotropic * (w @ w.t()) for w, x in zip(weights, inputs))
    basis = top_eigenvectors(output_moments, rank, oversample)
    factors = [ridge_factor(basis.t() @ w, moments(x, chunk) if x is not None else None, ridge)
               for w, x in zip(weights, inputs)]
    return basis, torch.stack(factors)


@tool
def main(argv=None):
    parser = argparse.ArgumentParser(prog="distill", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    common_arguments(parser)
    parser.add_argument("--calib-path", required=True, help="the file collect-calib wrote for this model")
    parser.add_argument("--ridge", type=float, default=0.01, help="ridge strength, relative to the inputs' scale")
    parser.add_argument("--chunk", type=int, default=4096, help="calibration rows per matmul for gate and up")
    parser.add_argument("--chunk-w2", type=int, default=1024, help="calibration rows per matmul for down")
    parser.add_argument("--pca-oversample", type=int, default=32,
                        help="extra columns of the randomized eigensolver (0: exact eigendecomposition)")
    args = parser.parse_args(argv)
    if args.ridge < 0:
        raise ValueError(f"--ridge {args.ridge} must not be negative")
    layers = moe_layers(args.model_path)
    check_rank(args.rank, layers)
    with safe_open(args.calib_path, "pt", "cpu") as calib:
        source = (calib.metadata() or {}).get("fingerprint")
        if source != fingerprint(args.model_path, layers):
            raise ValueError(f"{args.calib_path!r} was collected from another model than {args.model_path!r} (its "
                             f"router weights differ); run collect-calib on this model")
        output_dir = args.output_dir or os.path.join(args.model_path, FOLDER)
        prepare_output(output_dir, args.overwrite)
        reader, bases = CheckpointReader(args.model_path), {}
        for layer in tqdm(layers, desc="distill", unit="layer"):
            keys = [f"layer_{layer.index}_expert_{e}" for e in range(layer.num_experts)]
            inputs = [calib.get_tensor(k).to(args.device, torch.float32) if k in calib.keys() else None for k in keys]
            gate, up, down = (reader.experts(layer, p).to(args.device, torch.float32) for p in ("gate", "up", "down"))

            def activations(x, e):  # what the dense expert's down projection reads
                return torch.nn.functional.silu(x @ gate[e].t()) * (x @ up[e].t())
            hidden = [None if x is None else torch.cat([activations(x[s:s + args.chunk_w2], e)
                                                        for s in range(0, x.size(0), args.chunk_w2)])
                      for e, x in enumerate(inputs)]
            rank_13, rank_down = (projection_rank(layer, p, args.rank) for p in ("gate", "down"))
            settings = (args.ridge, args.chunk, args.pca_oversample)
            factors = {"gate": distill_projection(gate, inputs, rank_13, *settings),
                       "up": distill_projection(up, inputs, rank_13, *settings),
                       "down": distill_projection(down, hidden, rank_down, args.ridge, args.chunk_w2,
                                                  args.pca_oversample)}
            bases |= write_layer(output_dir, layer, factors, DTYPES[args.dtype])
    save_file(bases, os.path.join(output_dir, "U_matrices.safetensors"))
    write_metadata(output_dir, args.rank, args.dtype, "distill",
                   dict(ridge=args.ridge, pca_oversample=args.pca_oversample, calib_fingerprint=source), layers)
    print(f"wrote rank-{args.rank} distilled factors of {len(layers)} MoE layers to {output_dir}")


if __name__ == "__main__":
    main()
