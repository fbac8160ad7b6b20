"""The hooks a nanovllm plugin can implement.

A plugin is a module (or object) with functions decorated by ``nanovllm.hookimpl`` whose names
are hook names below. Publish it as a package with an entry point in the group ``nanovllm``::

    [project.entry-points.nanovllm]
    my_plugin = "my_package.plugin_module"

Every hook receives a ``register`` callback; call it once per thing you provide. Hooks are called
once per process, when the engine first needs them. Core registers its own implementations through
the same hooks (``nanovllm/default_plugins/``).

Every kind of plugin class is chosen the same way: it has a ``name`` and a ``priority`` and answers
``unsupported_reason(...)`` (None when it can serve, else a sentence saying why not). The user may
name one (``LLM(attention_backend=...)``, ``expert_manager=``, ``kv_retention=``); otherwise the
supported one with the highest priority wins. ``nanovllm info`` shows every candidate and its reason.
"""
from pluggy import HookimplMarker, HookspecMarker

hookspec = HookspecMarker("nanovllm")
hookimpl = HookimplMarker("nanovllm")


@hookspec
def register_attention_backends(register):
    """Provide attention backends.

    Call ``register(backend_class)`` with a subclass of ``nanovllm.AttentionBackend``. The class
    states what it supports (``device_types``, ``min_capability``, ``dtypes``, ``head_sizes``,
    ``block_size_multiple``) and a ``priority``; the engine builds one instance per attention layer,
    ``backend_class(num_heads, head_dim, num_kv_heads, scale, config)``, and calls its ``forward``.
    """


@hookspec
def register_models(register):
    """Provide model architectures.

    Call ``register(architecture, model_class)`` where ``architecture`` is a name from a
    Hugging Face config's ``architectures`` list (e.g. ``"Qwen3ForCausalLM"``). The engine builds
    ``model_class(config)`` (a ``nanovllm.Config``; the Hugging Face config is ``config.hf_config``)
    under the compute dtype and device, loads weights through ``nanovllm.loader.load_model`` and
    calls ``model(input_ids, positions)`` for hidden states and ``model.compute_logits(hidden_states)``
    for logits. Attention must go through ``nanovllm.layers.attention.Attention`` and mixture-of-experts
    blocks through ``nanovllm.layers.moe.SparseMoE``, so the engine can wire in the KV cache, the
    attention backend, the KV-retention policy and the expert manager.
    """


@hookspec
def register_options(register):
    """Add keyword options to ``LLM(...)``.

    Call ``register(name, default, help)``. The engine accepts ``name`` as a keyword argument,
    stores its value in ``config.plugin_options[name]`` (``default`` when not given) and lists it
    among the known options in the error for unknown ones. A name may not repeat a core option
    or another plugin's. Every plugin object receives the ``Config``, so it can read its options.
    """


@hookspec
def register_expert_managers(register):
    """Provide expert managers for mixture-of-experts layers.

    Call ``register(manager_class)`` with a subclass of ``nanovllm.ExpertManager``. A manager owns how
    one MoE layer's expert weights are stored (on the device, in host memory, factorised...), loads
    them from the checkpoint and computes the selected experts for a step's tokens. The engine calls
    ``manager_class.install(model, config)``, which puts one manager into every MoE layer. Core
    registers ``resident`` (the default) and ``offload``.
    """


@hookspec
def register_kv_retention_policies(register):
    """Provide KV-retention policies: which prompt tokens keep their K and V once the prompt is computed.

    Call ``register(policy_class)`` with a subclass of ``nanovllm.KVRetentionPolicy``. When a sequence's
    prompt completes, the policy says how many KV tokens to keep and, per layer and KV head, which;
    the engine gathers those into fresh blocks right after each layer's attention and frees the rest in
    the same step. Core registers ``keep-all`` (the default) and ``recent``.
    """
