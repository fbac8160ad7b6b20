"""Load safetensors shards of a Hugging Face checkpoint into a nanovllm model."""
import glob
import os

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from nanovllm.layers.linear import copy_checked


def _default_loader(param: nn.Parameter, loaded: torch.Tensor):
    copy_checked(param.data, loaded)


def load_model(model: nn.Module, path: str):
    """Copy every checkpoint tensor into its parameter; a missing or mismatched tensor names itself.

    ``model.packed_modules_mapping`` maps a checkpoint module name to (packed module name, shard),
    e.g. ``{"q_proj": ("qkv_proj", "q")}``; ``model.ignored_checkpoint_tensors`` lists names to skip. A module
    with ``load_checkpoint_tensor`` loads the tensors below its name itself, unless its ``reads_checkpoint``
    is False: then they are not even read (a manager that brings its own weights).
    """
    files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    if not files:
        raise FileNotFoundError(f"no *.safetensors files in {path!r}; nanovllm loads safetensors checkpoints only")
    packed = getattr(model, "packed_modules_mapping", {})
    ignored = getattr(model, "ignored_checkpoint_tensors", set())
    # Modules that load their own checkpoint tensors (MoE expert managers), by name prefix.
    delegates = {name: m for name, m in model.named_modules() if hasattr(m, "load_checkpoint_tensor")}
    params = {name: p for name, p in model.named_parameters() if _owner(name, delegates) is None}
    expected = {}  # parameter name -> shard ids it must receive
    for name in params:
        shards = {shard for src, (dst, shard) in packed.items() if f".{dst}." in f".{name}"}
        expected[name] = shards or {None}
    loaded = {name: set() for name in params}
    for file in files:
        with _open_checked(file) as f:
            for tensor_name in f.keys():
                if tensor_name in ignored:
                    continue
                owner = _owner(tensor_name, delegates)
                if owner is not None:
                    if not getattr(delegates[owner], "reads_checkpoint", True):
                        continue
                    try:
                        delegates[owner].load_checkpoint_tensor(tensor_name[len(owner) + 1:], f.get_tensor(tensor_name))
                    except ValueError as exc:
                        raise ValueError(f"checkpoint tensor {tensor_name!r}: {exc}") from None
                    continue
                param_name, shard = tensor_name, None
                for src, (dst, shard_id) in packed.items():
                    if f".{src}." in f".{tensor_name}":
                        param_name, shard = tensor_name.replace(src, dst, 1), shard_id
                        break
                if param_name not in params:
                    raise ValueError(f"checkpoint tensor {tensor_name!r} in {os.path.basename(file)} has no "
                                     f"matching parameter in {type(model).__name__}")
                param = params[param_name]
                weight_loader = getattr(param, "weight_loader", _default_loader)
                try:
                    with torch.no_grad():
                        if shard is None:
                            weight_loader(param, f.get_tensor(tensor_name))
                        else:
                            weight_loader(param, f.get_tensor(tensor_name), shard)
                except ValueError as exc:
                    raise ValueError(f"checkpoint tensor {tensor_name!r}: {exc}") from None
                loaded[param_name].add(shard)
    checkpoint_name = {(dst, shard): src for src, (dst, shard) in packed.items()}
    missing = []
    for name, shards in expected.items():
        for shard in sorted(shards - loaded[name], key=str):
            if shard is None:
                missing.append(name)
            else:
                dst = next(dst for dst, s in checkpoint_name if s == shard and f".{dst}." in f".{name}")
                missing.append(name.replace(dst, checkpoint_name[dst, shard], 1))
    for prefix, module in delegates.items():
        missing += [f"{prefix}.{name}" for name in module.missing_checkpoint_tensors()]
    if missing:
        raise ValueError(f"checkpoint {path!r} lacks tensor(s) for: {', '.join(missing)}")


def _open_checked(file: str):
    try:
        return safe_open(file, "pt", "cpu")
    except SafetensorError as exc:  # the header is checked against the file's size: truncation shows here
        raise ValueError(f"{file} is not a readable safetensors file ({exc}): it is truncated or corrupt; copy or "
                         f"download it again") from None


def _owner(name: str, delegates: dict) -> str | None:
    """The prefix of ``name`` that names a self-loading module, if any."""
    parts = name.split(".")
    for end in range(len(parts) - 1, 0, -1):
        prefix = ".".join(parts[:end])
        if prefix in delegates:
            return prefix
    return None
