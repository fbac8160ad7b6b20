"""Model architectures for nanovllm, registered through the ``register_models`` hook."""
import nanovllm

from nanovllm_models.dense import LlamaForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM


@nanovllm.hookimpl
def register_models(register):
    register("LlamaForCausalLM", LlamaForCausalLM)
    register("Qwen2ForCausalLM", Qwen2ForCausalLM)
    register("Qwen3ForCausalLM", Qwen3ForCausalLM)
