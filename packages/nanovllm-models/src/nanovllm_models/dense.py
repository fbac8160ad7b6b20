"""Decoder-only transformers: Llama 2/3, Qwen2 and Qwen3 differ only in biases and QK norm; MoE models
(moe.py) only in their feed-forward blocks."""
import torch
from torch import nn

from nanovllm import Config
from nanovllm.layers.activation import SiluAndMul
from nanovllm.layers.attention import Attention
from nanovllm.layers.embed_head import ParallelLMHead, VocabParallelEmbedding
from nanovllm.layers.layernorm import RMSNorm
from nanovllm.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from nanovllm.layers.rotary_embedding import get_rope


class DecoderAttention(nn.Module):
    def __init__(self, config, qkv_bias: bool, o_bias: bool, qk_norm: bool):
        super().__init__()
        num_heads = config.num_attention_heads
        num_kv_heads = getattr(config, "num_key_value_heads", None) or num_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // num_heads
        self.qkv_proj = QKVParallelLinear(config.hidden_size, head_dim, num_heads, num_kv_heads, bias=qkv_bias)
        self.num_heads, self.num_kv_heads = self.qkv_proj.num_heads, self.qkv_proj.num_kv_heads
        self.head_dim = head_dim
        self.o_proj = RowParallelLinear(num_heads * head_dim, config.hidden_size, bias=o_bias)
        self.rotary_emb = get_rope(head_dim, config.max_position_embeddings, config)
        self.attn = Attention(self.num_heads, head_dim, head_dim**-0.5, self.num_kv_heads)
        if qk_norm:
            self.q_norm = RMSNorm(head_dim, config.rms_norm_eps)
            self.k_norm = RMSNorm(head_dim, config.rms_norm_eps)
        self.qk_norm = qk_norm

    def forward(self, positions: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        q, k, v = self.qkv_proj(x).split([q_size, kv_size, kv_size], dim=-1)
        q = q.view(-1, self.num_heads, self.head_dim)
        k = k.view(-1, self.num_kv_heads, self.head_dim)
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        q, k = self.rotary_emb(positions, q, k, (self.q_norm, self.k_norm) if self.qk_norm else None)
        return self.o_proj(self.attn(q, k, v))


class MLP(nn.Module):
    def __init__(self, config, bias: bool, intermediate_size: int | None = None):
        super().__init__()
        if config.hidden_act != "silu":
            raise ValueError(f"hidden_act={config.hidden_act!r} is not supported; only silu is")
        intermediate_size = intermediate_size or config.intermediate_size
        self.gate_up_proj = MergedColumnParallelLinear(config.hidden_size, [intermediate_size] * 2, bias=bias)
        self.down_proj = RowParallelLinear(intermediate_size, config.hidden_size, bias=bias)
        self.act_fn = SiluAndMul()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_up_proj(x)))


class DecoderLayer(nn.Module):
    def __init__(self, config, biases: tuple[bool, bool, bool], qk_norm: bool, feed_forward: tuple[str, nn.Module]):
        super().__init__()
        qkv_bias, o_bias, _ = biases
        self.self_attn = DecoderAttention(config, qkv_bias, o_bias, qk_norm)
        self.feed_forward_name, module = feed_forward  # named as in the checkpoint: mlp, block_sparse_moe...
        self.add_module(self.feed_forward_name, module)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, positions, hidden, residual):
        if residual is None:
            hidden, residual = self.input_layernorm(hidden), hidden
        else:
            hidden, residual = self.input_layernorm(hidden, residual)
        hidden = self.self_attn(positions, hidden)
        hidden, residual = self.post_attention_layernorm(hidden, residual)
        return getattr(self, self.feed_forward_name)(hidden), residual


class DecoderModel(nn.Module):
    def __init__(self, config, biases, qk_norm, make_feed_forward):
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, biases, qk_norm, make_feed_forward(config, i))
                                    for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, input_ids, positions):
        hidden, residual = self.embed_tokens(input_ids), None
        for layer in self.layers:
            hidden, residual = layer(positions, hidden, residual)
        hidden, _ = self.norm(hidden, residual)
        return hidden


class DenseForCausalLM(nn.Module):
    qk_norm = False
    packed_modules_mapping = {
        "q_proj": ("qkv_proj", "q"),
        "k_proj": ("qkv_proj", "k"),
        "v_proj": ("qkv_proj", "v"),
        "gate_proj": ("gate_up_proj", 0),
        "up_proj": ("gate_up_proj", 1),
    }

    def __init__(self, config: Config):
        super().__init__()
        hf_config = config.hf_config
        self.model = DecoderModel(hf_config, self.biases(hf_config), self.qk_norm, self.make_feed_forward)
        self.lm_head = ParallelLMHead(hf_config.vocab_size, hf_config.hidden_size)
        self.ignored_checkpoint_tensors = set()
        if getattr(hf_config, "tie_word_embeddings", False):
            self.lm_head.weight = self.model.embed_tokens.weight
            self.ignored_checkpoint_tensors.add("lm_head.weight")

    def make_feed_forward(self, config, layer_index: int) -> tuple[str, nn.Module]:
        """The feed-forward block of a layer (``config``: the Hugging Face config), with its name in the checkpoint."""
        return "mlp", MLP(config, self.biases(config)[2])

    @staticmethod
    def biases(config) -> tuple[bool, bool, bool]:
        """(qkv, o_proj, mlp) biases."""
        attention_bias = getattr(config, "attention_bias", False)
        return attention_bias, attention_bias, getattr(config, "mlp_bias", False)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids, positions)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor | None:
        return self.lm_head(hidden)


class LlamaForCausalLM(DenseForCausalLM):
    pass


class Qwen2ForCausalLM(DenseForCausalLM):
    @staticmethod
    def biases(config):
        return True, False, False


class Qwen3ForCausalLM(DenseForCausalLM):
    qk_norm = True
