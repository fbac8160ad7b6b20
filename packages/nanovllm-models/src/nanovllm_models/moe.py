"""Mixture-of-experts models: the dense decoder with sparse feed-forward blocks."""
import torch

from nanovllm.layers.linear import ReplicatedLinear
from nanovllm.layers.moe import SparseMoE
from nanovllm_models.dense import MLP, DenseForCausalLM

QWEN_PROJECTIONS = {"gate_proj": "gate", "up_proj": "up", "down_proj": "down"}


class SharedExpertMoE(SparseMoE):
    """Qwen2-MoE's block: routed experts plus a shared expert scaled by a sigmoid gate."""

    def __init__(self, config):
        super().__init__(config.num_experts, config.num_experts_per_tok, config.hidden_size,
                         config.moe_intermediate_size, config.norm_topk_prob, QWEN_PROJECTIONS)
        self.shared_expert = MLP(config, False, config.shared_expert_intermediate_size)
        self.shared_expert_gate = ReplicatedLinear(config.hidden_size, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shared = torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return super().forward(x) + shared


def is_sparse_layer(config, layer_index: int) -> bool:
    """Qwen MoE configs can keep some layers dense (mlp_only_layers, decoder_sparse_step)."""
    return (layer_index not in getattr(config, "mlp_only_layers", [])
            and config.num_experts > 0 and (layer_index + 1) % getattr(config, "decoder_sparse_step", 1) == 0)


class MixtralForCausalLM(DenseForCausalLM):
    def make_feed_forward(self, config, layer_index):
        return "block_sparse_moe", SparseMoE(config.num_local_experts, config.num_experts_per_tok, config.hidden_size,
                                             config.intermediate_size, True, {"w1": "gate", "w3": "up", "w2": "down"})


class Qwen2MoeForCausalLM(DenseForCausalLM):
    @staticmethod
    def biases(config):
        return True, False, False

    def make_feed_forward(self, config, layer_index):
        if is_sparse_layer(config, layer_index):
            return "mlp", SharedExpertMoE(config)
        return "mlp", MLP(config, False)


class Qwen3MoeForCausalLM(DenseForCausalLM):
    qk_norm = True

    def make_feed_forward(self, config, layer_index):
        if is_sparse_layer(config, layer_index):
            return "mlp", SparseMoE(config.num_experts, config.num_experts_per_tok, config.hidden_size,
                                    config.moe_intermediate_size, config.norm_topk_prob, QWEN_PROJECTIONS)
        return "mlp", MLP(config, False)
