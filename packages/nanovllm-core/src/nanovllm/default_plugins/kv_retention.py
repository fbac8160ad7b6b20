"""Core's KV-retention policies, registered through ``register_kv_retention_policies`` like any plugin's:
``keep-all`` (the default) and ``recent`` (StreamingLLM's attention sink and recent window, applied once)."""
import torch

from nanovllm.hookspecs import hookimpl
from nanovllm.kv_retention import KVRetentionPolicy


class KeepAll(KVRetentionPolicy):
    """Every KV entry stays (no work at all)."""

    name = "keep-all"


class KeepRecent(KVRetentionPolicy):
    """The prompt's first kv_keep_first and last kv_keep_last tokens, in every layer and head."""

    name = "recent"

    @classmethod
    def unsupported_reason(cls, config, by_name=False):
        return None if by_name else "is used only when asked for by name"

    def __init__(self, config):
        super().__init__(config)
        self.first = config.plugin_options["kv_keep_first"]
        self.last = config.plugin_options["kv_keep_last"]
        for name, value, least in (("kv_keep_first", self.first, 0), ("kv_keep_last", self.last, 1)):
            if not isinstance(value, int) or isinstance(value, bool) or value < least:
                raise ValueError(f"{name}={value!r} must be an integer of at least {least}")

    def num_kept(self, num_prompt_tokens):
        return min(num_prompt_tokens, self.first + self.last)

    def select(self, layer, queries, keys, num_kept, scale):
        n = keys.size(0)
        positions = torch.cat([torch.arange(self.first), torch.arange(n - self.last, n)]).to(keys.device)
        return positions.expand(keys.size(1), -1)


@hookimpl
def register_kv_retention_policies(register):
    register(KeepAll)
    register(KeepRecent)


@hookimpl
def register_options(register):
    register("kv_keep_first", 4, "kv_retention='recent': the prompt's first tokens kept (attention sinks)")
    register("kv_keep_last", 2044, "kv_retention='recent': the prompt's last tokens kept")
