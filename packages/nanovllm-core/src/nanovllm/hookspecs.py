"""The hooks a nanovllm plugin can implement.

A plugin is a module (or object) with functions decorated by ``nanovllm.hookimpl`` whose names
are hook names below. Publish it as a package with an entry point in the group ``nanovllm``::

    [project.entry-points.nanovllm]
    my_plugin = "my_package.plugin_module"

Every registration hook receives a ``register`` callback; call it once per thing you provide.
Hooks are called once per process, when the plugin manager is first used.
"""
from pluggy import HookspecMarker

hookspec = HookspecMarker("nanovllm")


@hookspec
def register_attention_backends(register):
    """Provide attention backends.

    Call ``register(backend_class)`` with a subclass of ``nanovllm.AttentionBackend``. The class
    states what it supports (``device_types``, ``min_capability``, ``dtypes``, ``head_sizes``,
    ``block_size_multiple``) and a ``priority``; the engine picks the supported backend with the
    highest priority unless the user names one with ``attention_backend=``.
    """


@hookspec
def register_models(register):
    """Provide model architectures.

    Call ``register(architecture, model_class)`` where ``architecture`` is a name from a
    Hugging Face config's ``architectures`` list (e.g. ``"Qwen3ForCausalLM"``). The engine builds
    ``model_class(hf_config)`` under the compute dtype and device, loads weights through
    ``nanovllm.loader.load_model`` and calls ``model(input_ids, positions)`` for hidden states and
    ``model.compute_logits(hidden_states)`` for logits. Attention must go through
    ``nanovllm.layers.attention.Attention`` so the engine can wire in the KV cache and backend.
    """


@hookspec
def register_options(register):
    """Add keyword options to ``LLM(...)``.

    Call ``register(name, default, help)``. The engine accepts ``name`` as a keyword argument,
    stores its value in ``config.plugin_options[name]`` (``default`` when not given) and lists it
    among the known options in the error for unknown ones. A name may not repeat a core option
    or another plugin's.
    """


@hookspec
def register_expert_managers(register):
    """Provide expert managers for mixture-of-experts layers.

    Call ``register(manager_class)`` with a subclass of ``nanovllm.experts.ExpertManager``. A manager
    owns how one MoE layer's expert weights are stored (on the device, in host memory, factorised...)
    and computes the selected experts for a step's tokens. The user picks one with
    ``LLM(..., expert_manager=name)``; otherwise the first whose ``claims(config)`` is true, else
    ``resident``. Core registers its own managers (``resident``, ``offload``) through this hook.
    """
