"""Model architectures for nanovllm, registered through the ``register_models`` hook."""
import nanovllm

from nanovllm_models.dense import LlamaForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM
from nanovllm_models.moe import MixtralForCausalLM, Qwen2MoeForCausalLM, Qwen3MoeForCausalLM


@nanovllm.hookimpl
def register_models(register):
    for model_class in (LlamaForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM, MixtralForCausalLM,
                        Qwen2MoeForCausalLM, Qwen3MoeForCausalLM):
        register(model_class.__name__, model_class)
