"""Low-rank experts for nanovllm: each MoE layer keeps, per projection, a basis U shared by its experts and a small
factor V per expert, and computes the selected experts as x -> V_e -> U without forming their weights.

``LLM(path)`` uses them whenever ``path/svd_experts/`` exists (made by the ``decompose`` or ``distill`` tools);
``NANOVLLM_DISABLE_SVD=1`` or ``expert_manager="resident"`` runs the dense experts instead.
"""
import logging
import os

import torch
from safetensors import safe_open
from torch import nn

import nanovllm
from nanovllm.layers.activation import silu_and_mul
from nanovllm.layers.moe import SparseMoE, run_experts
from nanovllm_moe_svd.factors import FOLDER, MoELayer, layer_index, projection_rank, read_metadata, v_path

logger = logging.getLogger("nanovllm.moe_svd")  # under nanovllm: NANOVLLM_LOG_LEVEL applies


def factors_folder(config) -> str:
    return config.plugin_options["svd_experts_dir"] or os.path.join(config.model, FOLDER)


class SVDExperts(nanovllm.ExpertManager):
    """Low-rank experts: a basis per layer and projection shared by the experts, a small factor per expert."""

    name = "svd"
    priority = 100  # picked whenever the checkpoint has factors
    cuda_graphs = True
    reads_checkpoint = False  # the dense experts are never read: 90 GB of Mixtral's are not needed

    @classmethod
    def unsupported_reason(cls, config, by_name=False):
        if os.environ.get("NANOVLLM_DISABLE_SVD") == "1":
            return "is off: NANOVLLM_DISABLE_SVD=1"
        folder = factors_folder(config)
        if not os.path.isdir(folder):
            return f"needs low-rank factors in {folder} (made by decompose or distill)"
        return None

    @classmethod
    def install(cls, model, config):
        folder = factors_folder(config)
        metadata = read_metadata(folder)
        logger.info("Using SVD expert manager from %s (rank %d, %s)", folder, metadata["rank"], metadata["method"])
        managers = []
        with safe_open(os.path.join(folder, "U_matrices.safetensors"), "pt", "cpu") as bases:
            for name, moe in model.named_modules():
                if isinstance(moe, SparseMoE):
                    moe.experts = cls(moe.num_experts, moe.hidden_size, moe.intermediate_size, moe.checkpoint_names,
                                      config)
                    layer = MoELayer(layer_index(name), name, moe.num_experts, moe.hidden_size,
                                     moe.intermediate_size, moe.checkpoint_names)
                    moe.experts.load_factors(folder, layer, metadata["rank"], bases)
                    managers.append(moe.experts)
        return managers

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.rank_13 = self.rank_down = 0  # gate and up's rank, down's: set by load_factors

    def load_factors(self, folder: str, layer: MoELayer, rank: int, bases):
        """This tensor-parallel rank's slices of ``layer``'s factors; a shape that does not fit the model names
        both."""
        hidden, inter, full = self.hidden_size, self.intermediate_size, self.full_intermediate_size
        shard = slice(self.tp_rank * inter, (self.tp_rank + 1) * inter)
        self.rank_13, self.rank_down = (projection_rank(layer, p, rank) for p in ("gate", "down"))

        def checked(tensor, name, shape, where):
            if tuple(tensor.shape) != shape:
                raise ValueError(f"{where}: {name} is {list(tensor.shape)}, but rank {rank} factors of this model's "
                                 f"experts (hidden {hidden}, intermediate {full}) are {list(shape)}")
            return tensor.to(torch.get_default_device(), torch.get_default_dtype())

        def basis(projection, shape):
            key = f"layer_{layer.index}.{projection}"
            if key not in bases.keys():
                raise ValueError(f"{folder}/U_matrices.safetensors has no {key!r}: the factors were made for another "
                                 f"model (this one has a MoE layer {layer.index})")
            return checked(bases.get_tensor(key), key, shape, f"{folder}/U_matrices.safetensors")
        self.u_gate = nn.Parameter(basis("gate", (full, self.rank_13))[shard].contiguous(), requires_grad=False)
        self.u_up = nn.Parameter(basis("up", (full, self.rank_13))[shard].contiguous(), requires_grad=False)
        self.u_down = nn.Parameter(basis("down", (hidden, self.rank_down)), requires_grad=False)
        v13, v_down = [], []
        for expert in range(self.num_experts):
            path = v_path(folder, layer.index, expert)
            if not os.path.isfile(path):
                raise FileNotFoundError(f"{path} is missing: the factors were made for a model with fewer experts")
            with safe_open(path, "pt", "cpu") as f:
                v13.append(torch.cat([checked(f.get_tensor("gate"), "gate", (self.rank_13, hidden), path),
                                      checked(f.get_tensor("up"), "up", (self.rank_13, hidden), path)]))
                v_down.append(checked(f.get_tensor("down"), "down", (self.rank_down, full), path)[:, shard])
        self.v13 = nn.Parameter(torch.stack(v13), requires_grad=False)  # [E, 2r, H]: one grouped matmul for both
        self.v_down = nn.Parameter(torch.stack(v_down).contiguous(), requires_grad=False)  # [E, r', I / tp]

    def missing_checkpoint_tensors(self):
        return []  # the factors, loaded by install, stand for the dense experts

    def forward(self, x, topk_weights, topk_ids):
        if x.is_cuda:
            return self.grouped_forward(x, topk_weights, topk_ids)
        return run_experts(x, topk_weights, topk_ids, self._expert_output)  # CPU and MPS: one expert at a time

    def _expert_output(self, expert: int, rows: torch.Tensor) -> torch.Tensor:
        t = rows @ self.v13[expert].t()
        hidden = silu_and_mul(torch.cat([t[:, :self.rank_13] @ self.u_gate.t(), t[:, self.rank_13:] @ self.u_up.t()], 1))
        return (hidden @ self.v_down[expert].t()) @ self.u_down.t()

    def grouped_forward(self, x, topk_weights, topk_ids):
        """Both small factors by core's grouped Triton matmul over the pairs sorted by expert; the gate and up bases
        with SiLU-and-multiply in one kernel at decode; the down basis, one dense matmul, after each token's pairs are
        summed (it is linear). No host sync."""
        from nanovllm.kernels.grouped_moe import (block_m_for, grouped_matmul, sort_pairs_by_expert, split_k_for,
                                                  sum_pair_rows)
        from nanovllm_moe_svd.kernels import gate_up_silu
        num_pairs = topk_ids.numel()
        block_m = block_m_for(num_pairs)
        pair_ids, block_experts = sort_pairs_by_expert(topk_ids, self.num_experts, block_m)

        def factor(a, v, scale, a_row_div):  # [pairs, rank] = a @ V_e.T; few pairs split K to fill the GPU
            split = split_k_for(num_pairs, self.num_experts, v)
            out = torch.empty(num_pairs * split, v.shape[1], dtype=torch.float32 if split > 1 else x.dtype,
                              device=x.device)
            grouped_matmul(a, v, out, scale, pair_ids, block_experts, num_pairs, a_row_div, block_m, split_k=split)
            return out
        t13 = sum_pair_rows(factor(x, self.v13, None, topk_ids.size(1)), num_pairs, x.dtype)
        hidden = gate_up_silu(t13, self.u_gate, self.u_up)
        t_down = factor(hidden, self.v_down, topk_weights.flatten().float().contiguous(), 1)
        return sum_pair_rows(t_down, x.size(0), x.dtype) @ self.u_down.t()


@nanovllm.hookimpl
def register_expert_managers(register):
    register(SVDExperts)


@nanovllm.hookimpl
def register_options(register):
    register("svd_experts_dir", None, "expert_manager='svd': the low-rank factors' folder (default MODEL/svd_experts)")
