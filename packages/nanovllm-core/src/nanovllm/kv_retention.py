"""The KV-retention interface (which of a prompt's KV entries to keep once it is computed) and the choice
of a policy. Core's own policies live in ``nanovllm/default_plugins/kv_retention.py``."""
import torch

from nanovllm import plugins


class KVRetentionPolicy:
    """Decides, once a sequence's prompt has been computed, which of its KV entries the sequence keeps.

    When the scheduler schedules the step that completes a prompt it asks ``num_kept``; if that is below the
    prompt's length, the step computes at least the prompt's last ``window`` tokens, and right after each
    layer's attention the engine calls ``select`` and gathers the chosen entries into fresh blocks. The
    prompt's blocks are released in the same step, and the sequence goes on with the kept entries: later
    tokens keep their true positions and attend over what was kept. Each tensor-parallel rank has its own
    instance and selects for its own KV heads. ``config`` is the engine's ``Config`` (plugin options included).
    """

    name: str = ""
    priority: int = 0  # the highest-priority policy that supports the setting is used unless one is named
    window: int = 0  # how many of the prompt's last queries ``select`` reads

    def __init__(self, config):
        self.config = config

    @classmethod
    def unsupported_reason(cls, config, by_name: bool = False) -> str | None:
        """Why this policy cannot serve ``config`` (or is only used when named), or None."""
        return None

    def num_kept(self, num_prompt_tokens: int) -> int:
        """KV entries to keep (at least one), the same number for every layer and KV head, of a prompt this
        long; the prompt's length keeps everything (no work at all)."""
        return num_prompt_tokens

    def select(self, layer: int, queries: torch.Tensor, keys: torch.Tensor, num_kept: int,
               scale: float) -> torch.Tensor:
        """Positions to keep in one layer of one sequence: int64 [num_kv_heads, num_kept], each row distinct.

        queries: the prompt's last ``min(window, len)`` queries, [window, num_heads, head_dim]; keys: the whole
        prompt's, [num_prompt_tokens, num_kv_heads, head_dim]; both after rotary embedding; ``scale`` is the
        attention's softmax scale. Query head h reads KV head h // (num_heads // num_kv_heads).
        """
        raise NotImplementedError


def select_kv_retention_policy(config) -> tuple[type[KVRetentionPolicy], str]:
    """The policy named by ``kv_retention=``, else the highest-priority one that supports the setting."""
    return plugins.choose(plugins.kv_retention_policies(),
                          lambda cls, by_name: cls.unsupported_reason(config, by_name), config.kv_retention,
                          "kv_retention", "KV-retention policy", "this engine's options")
