"""The low-rank expert format and what the tools and the manager share about it.

Beside a checkpoint's weights, ``svd_experts/`` holds, for every MoE layer L and projection P (gate, up, down),
a basis ``U`` shared by the layer's experts and a small factor ``V`` per expert, so that expert e's weight is
``W = U @ V`` (``[out, in] = [out, rank] @ [rank, in]``, as Hugging Face stores W):

    svd_experts/metadata.json                       rank, dtype, method and its settings, the model's shapes
    svd_experts/U_matrices.safetensors              "layer_L.gate" [I, r], "layer_L.up" [I, r], "layer_L.down" [H, r']
    svd_experts/V_experts/layer_L_expert_E.safetensors   "gate" [r, H], "up" [r, H], "down" [r', I]

A projection's rank is the asked rank, or less where the experts' joint column space is smaller (at most
min(out, experts * in)): rank = intermediate size reproduces gate and up exactly, rank = hidden size down.
"""
import glob
import json
import os
import re
from dataclasses import dataclass

import torch
from safetensors import safe_open

PROJECTIONS = ("gate", "up", "down")
FOLDER = "svd_experts"


@dataclass(frozen=True)
class MoELayer:
    """One MoE layer as the model lays it out: its decoder layer index, module path and expert shapes."""

    index: int
    prefix: str  # e.g. "model.layers.3.block_sparse_moe"
    num_experts: int
    hidden_size: int
    intermediate_size: int
    checkpoint_names: dict  # checkpoint projection name -> gate / up / down

    def tensor_name(self, expert: int, projection: str) -> str:
        name = next(n for n, p in self.checkpoint_names.items() if p == projection)
        return f"{self.prefix}.experts.{expert}.{name}.weight"

    def shape(self, projection: str) -> tuple[int, int]:
        """[out, in] of one expert's weight."""
        h, i = self.hidden_size, self.intermediate_size
        return (h, i) if projection == "down" else (i, h)


def layer_index(module_name: str) -> int:
    match = re.search(r"layers\.(\d+)\.", module_name + ".")
    if match is None:
        raise ValueError(f"cannot tell the decoder layer of MoE module {module_name!r}: it has no 'layers.N' in its name")
    return int(match.group(1))


def moe_layers(model_path: str) -> list[MoELayer]:
    """The checkpoint's MoE layers, found by building its nanovllm model on the meta device (no memory)."""
    from nanovllm.config import Config
    from nanovllm.engine.llm_engine import resolve_model_class
    from nanovllm.layers.moe import SparseMoE
    config = Config(model_path)
    with torch.device("meta"):
        model = resolve_model_class(config.hf_config)(config)
    layers = [MoELayer(layer_index(name), name, m.num_experts, m.hidden_size, m.intermediate_size, m.checkpoint_names)
              for name, m in model.named_modules() if isinstance(m, SparseMoE)]
    if not layers:
        raise ValueError(f"{model_path!r} ({', '.join(config.hf_config.architectures or ['?'])}) has no "
                         f"mixture-of-experts layers: there are no experts to factorise")
    return layers


class CheckpointReader:
    """Reads single tensors of a safetensors checkpoint by name, whatever file holds them."""

    def __init__(self, model_path: str):
        self.files = {}
        for file in sorted(glob.glob(os.path.join(model_path, "*.safetensors"))):
            with safe_open(file, "pt", "cpu") as f:
                self.files.update(dict.fromkeys(f.keys(), file))
        if not self.files:
            raise FileNotFoundError(f"no *.safetensors files in {model_path!r}")

    def get(self, name: str) -> torch.Tensor:
        if name not in self.files:
            raise ValueError(f"the checkpoint has no tensor {name!r}")
        with safe_open(self.files[name], "pt", "cpu") as f:
            return f.get_tensor(name)

    def experts(self, layer: MoELayer, projection: str) -> torch.Tensor:
        """All of one layer's expert weights for ``projection``, stacked: [E, out, in]."""
        return torch.stack([self.get(layer.tensor_name(e, projection)) for e in range(layer.num_experts)])


def projection_rank(layer: MoELayer, projection: str, rank: int) -> int:
    """The rank one projection's basis gets: ``rank``, capped by the dimension of its experts' column space."""
    out, inp = layer.shape(projection)
    return min(rank, out, layer.num_experts * inp)


def check_rank(rank: int, layers: list[MoELayer]):
    if rank < 1:
        raise ValueError(f"--rank {rank} must be at least 1")
    for layer in layers:
        useful = max(projection_rank(layer, p, rank=2**62) for p in PROJECTIONS)
        if rank > useful:
            raise ValueError(f"--rank {rank} is above what layer {layer.index}'s experts can use (hidden "
                             f"{layer.hidden_size}, intermediate {layer.intermediate_size}, {layer.num_experts} "
                             f"experts: at most {useful}); choose a rank up to {useful}")


def prepare_output(output_dir: str, overwrite: bool):
    if os.path.exists(output_dir) and os.listdir(output_dir) and not overwrite:
        raise FileExistsError(f"{output_dir!r} exists and is not empty; pass --overwrite to replace it")
    os.makedirs(os.path.join(output_dir, "V_experts"), exist_ok=True)


def write_metadata(output_dir: str, rank: int, dtype: str, method: str, settings: dict, layers: list[MoELayer]):
    metadata = dict(rank=rank, dtype=dtype, method=method, settings=settings, hidden_size=layers[0].hidden_size,
                    layers={str(layer.index): dict(num_experts=layer.num_experts,
                                                   intermediate_size=layer.intermediate_size) for layer in layers})
    with open(os.path.join(output_dir, "metadata.json"), "w") as f:
        json.dump(metadata, f, indent=1)


def v_path(folder: str, layer: int, expert: int) -> str:
    return os.path.join(folder, "V_experts", f"layer_{layer}_expert_{expert}.safetensors")


def read_metadata(folder: str) -> dict:
    path = os.path.join(folder, "metadata.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{folder!r} has no metadata.json: it was not made by decompose or distill")
    with open(path) as f:
        return json.load(f)


def fingerprint(model_path: str, layers: list[MoELayer]) -> str:
    """Identifies a checkpoint's weights: a hash of the first MoE layer's router."""
    import xxhash
    router = CheckpointReader(model_path).get(f"{layers[0].prefix}.gate.weight")
    return xxhash.xxh64(router.float().numpy().tobytes()).hexdigest()


def tool(main):
    """A console script's entry point: bad input ends in one line on stderr and exit status 1."""
    def run(argv=None):
        try:
            return main(argv)
        except (ValueError, FileExistsError, FileNotFoundError) as exc:
            raise SystemExit(f"error: {exc}") from None
    return run
