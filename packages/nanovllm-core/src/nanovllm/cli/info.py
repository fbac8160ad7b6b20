"""What ``nanovllm info`` prints: the platform, the plugins and what they provide, and the attention backend
and dtype that would be chosen."""
import torch

from nanovllm import plugins
from nanovllm.attention_backend import select_backend
from nanovllm.config import compute_dtype
from nanovllm.platform import Platform, detect_platform, flash_attn_version


def platform_report(platform: Platform | None = None) -> list[str]:
    platform = platform or detect_platform()
    lines = [f"Platform: {platform.describe()}", f"torch {torch.__version__}"]
    if platform.device_type == "cuda":
        lines.append(f"GPU: {platform.name}, compute capability {platform.capability[0]}.{platform.capability[1]} "
                     f"({platform.arch_family}), {platform.total_memory / 2**30:.1f} GiB")
        version = flash_attn_version()
        lines.append(f"flash-attn: {version} installed (major version {version.split('.')[0]})" if version
                     else "flash-attn: not installed")
    return lines


def plugin_report() -> list[str]:
    lines = ["Plugins:"]
    for name, dist, version in plugins.installed_plugins():
        lines.append(f"  {name}: {dist} {version}")
    for name, reason in plugins.load_failures.items():
        lines.append(f"  {name}: FAILED to load ({reason})")
    if len(lines) == 1:
        lines.append("  none installed")
    lines.append(f"Architectures: {', '.join(sorted(plugins.model_classes())) or 'none'}")
    for title, option, candidates in (("Expert managers", "expert_manager", plugins.expert_managers()),
                                      ("KV-retention policies", "kv_retention", plugins.kv_retention_policies())):
        lines.append(f"{title} ({option}=):")
        for name, cls in sorted(candidates.items(), key=lambda item: -item[1].priority):
            lines.append(f"  {name} (priority {cls.priority}): {(cls.__doc__ or '').strip().splitlines()[0]}")
    lines.append("Plugin options (keywords of LLM):")
    for option in plugins.plugin_options().values():
        lines.append(f"  {option.name} (default {option.default!r}): {option.help}")
    return lines


def backend_report(platform: Platform | None = None, dtype: torch.dtype | None = None, head_dim: int = 128,
                   block_size: int = 256) -> list[str]:
    """Each installed attention backend, whether it fits this platform, and the one that would be chosen."""
    platform = platform or detect_platform()
    dtype = dtype or compute_dtype(torch.bfloat16, "auto", platform)
    backends = plugins.attention_backends()
    lines = [f"Dtype: {str(dtype).removeprefix('torch.')} for a bf16 checkpoint with dtype='auto'",
             f"Attention backends (dtype {str(dtype).removeprefix('torch.')}, head size {head_dim}, "
             f"block size {block_size}):"]
    for name, cls in sorted(backends.items(), key=lambda item: -item[1].priority):
        reason = cls.unsupported_reason(platform, dtype, head_dim, block_size)
        lines.append(f"  {name} (priority {cls.priority}): {'supported' if reason is None else reason}")
    try:
        _, why = select_backend(backends, platform, dtype, head_dim, block_size)
        lines.append(f"Chosen: {why}")
    except (RuntimeError, ValueError) as exc:
        lines.append(f"Chosen: none: {exc}")
    return lines


def print_attention_backend_info(platform: Platform | None = None):
    """Print the platform (GPU, compute capability, family, flash-attn), the installed plugins, and
    which attention backend would be chosen and why: what ``nanovllm info`` shows."""
    for line in platform_report(platform) + plugin_report() + backend_report(platform):
        print(line)
