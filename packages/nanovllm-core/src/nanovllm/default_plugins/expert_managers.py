"""Core's expert managers, registered through ``register_expert_managers`` like any plugin's:
``resident`` (every expert on the device) and ``offload`` (host memory behind a device cache)."""
from collections import Counter, OrderedDict

import torch
from torch import nn

from nanovllm.expert_manager import ExpertManager
from nanovllm.hookspecs import hookimpl
from nanovllm.layers.moe import SparseMoE, grouped_experts


class ResidentExperts(ExpertManager):
    """Every expert on the device.

    Gate and up stacked as w13 [E, 2I, H], down as w2 [E, H, I]. On CUDA a grouped Triton kernel computes
    every expert at once; elsewhere, one matmul pair per expert."""

    name = "resident"
    cuda_graphs = True

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.w13 = nn.Parameter(torch.empty(self.num_experts, 2 * self.intermediate_size, self.hidden_size),
                                requires_grad=False)
        self.w2 = nn.Parameter(torch.empty(self.num_experts, self.hidden_size, self.intermediate_size),
                               requires_grad=False)

    def load_expert(self, expert, projection, tensor):
        size = self.intermediate_size
        target = {"gate": self.w13[expert, :size], "up": self.w13[expert, size:], "down": self.w2[expert]}[projection]
        target.copy_(tensor)

    def forward(self, x, topk_weights, topk_ids):
        if x.is_cuda:
            from nanovllm.kernels.grouped_moe import grouped_moe
            return grouped_moe(x, self.w13, self.w2, topk_weights, topk_ids)
        return grouped_experts(x, topk_weights, topk_ids, lambda e: (self.w13[e], self.w2[e]))


class OffloadedExperts(ExpertManager):
    """Experts in host memory behind a small device cache per layer.

    Pinned host memory; a per-layer device cache of a few experts, least recently used out first. Copies run
    on a side stream; ``prefetch`` starts the next layer's likely experts early.

    Options: ``offload_experts_per_layer`` (cache slots per layer) or ``offload_cache_gib`` (a device
    budget shared by all layers); by default twice the experts a token uses.
    """

    name = "offload"

    @classmethod
    def unsupported_reason(cls, config, by_name=False):
        return None if by_name else "is used only when asked for by name"

    @classmethod
    def install(cls, model, config):
        managers = super().install(model, config)
        moe_layers = [m for m in model.modules() if isinstance(m, SparseMoE)]
        for manager, next_layer in zip(managers, moe_layers[1:]):  # bound methods: no module cycle
            manager.route_next, manager.prefetch_next = next_layer.route, next_layer.experts.prefetch
        return managers

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        device = torch.get_default_device()
        on_cuda = device.type == "cuda"
        shape13 = (self.num_experts, 2 * self.intermediate_size, self.hidden_size)
        shape2 = (self.num_experts, self.hidden_size, self.intermediate_size)
        self.w13_host = torch.empty(shape13, device="cpu", pin_memory=on_cuda)
        self.w2_host = torch.empty(shape2, device="cpu", pin_memory=on_cuda)
        self.num_slots = self._num_slots(self.config)
        self.w13_slots = torch.empty((self.num_slots, *shape13[1:]), device=device)
        self.w2_slots = torch.empty((self.num_slots, *shape2[1:]), device=device)
        self.slot_of: OrderedDict[int, int] = OrderedDict()  # expert -> slot, least recently used first
        self.copied: dict[int, torch.cuda.Event] = {}  # expert -> its copy's completion, on CUDA
        self.slots_read: torch.cuda.Event | None = None  # the last kernels reading the slots, on CUDA
        self.copy_stream = torch.cuda.Stream(device) if on_cuda else None
        self.prefetched: set[int] = set()  # copied on a guess and not used yet
        self.route_next = self.prefetch_next = None  # the next MoE layer's router and prefetch, set by install
        self.hits = self.misses = self.evictions = self.prefetches = self.prefetch_hits = 0

    def _num_slots(self, config) -> int:
        options = config.plugin_options
        slots = options.get("offload_experts_per_layer")
        if slots is None and options.get("offload_cache_gib") is not None:
            expert_bytes = 3 * self.intermediate_size * self.hidden_size * torch.get_default_dtype().itemsize
            slots = int(options["offload_cache_gib"] * 2**30) // (expert_bytes * config.hf_config.num_hidden_layers)
        if slots is None:
            slots = 2 * config.hf_config.num_experts_per_tok
        if slots < 1:
            raise ValueError(f"the expert cache holds {slots} experts per layer; give offload_experts_per_layer >= 1 "
                             f"or a larger offload_cache_gib")
        return min(slots, self.num_experts)

    def load_expert(self, expert, projection, tensor):
        size = self.intermediate_size
        target = {"gate": self.w13_host[expert, :size], "up": self.w13_host[expert, size:],
                  "down": self.w2_host[expert]}[projection]
        target.copy_(tensor)

    def _make_resident(self, expert: int, keep: set[int]):
        """Copy ``expert`` into a slot unless it is there, evicting the least recently used outside ``keep``."""
        if expert in self.slot_of:
            self.slot_of.move_to_end(expert)
            return
        if len(self.slot_of) < self.num_slots:
            slot = len(self.slot_of)
        else:
            victim = next(e for e in self.slot_of if e not in keep)
            slot = self.slot_of.pop(victim)
            self.copied.pop(victim, None)
            self.prefetched.discard(victim)
            self.evictions += 1
        self.slot_of[expert] = slot
        if self.copy_stream is None:
            self.w13_slots[slot].copy_(self.w13_host[expert])
            self.w2_slots[slot].copy_(self.w2_host[expert])
            return
        if self.slots_read is not None:
            self.copy_stream.wait_event(self.slots_read)  # the slot's last reader is done
        with torch.cuda.stream(self.copy_stream):
            self.w13_slots[slot].copy_(self.w13_host[expert], non_blocking=True)
            self.w2_slots[slot].copy_(self.w2_host[expert], non_blocking=True)
            self.copied[expert] = torch.cuda.Event()
            self.copied[expert].record()

    def prefetch(self, topk_ids: torch.Tensor):
        """Start copying the experts ``topk_ids`` (a guess for this layer's next call) names most often, as many
        as there are slots."""
        likely = [e for e, _ in Counter(topk_ids.flatten().tolist()).most_common(self.num_slots)]
        for expert in likely:
            if expert not in self.slot_of:
                self.prefetches += 1
                self.prefetched.add(expert)
                self._make_resident(expert, keep=set(likely))

    def forward(self, x, topk_weights, topk_ids):
        # The next layer's router applied to this layer's input guesses its experts. The guess is read before
        # this layer's experts are queued (reading waits for the device); its copies are queued after this
        # layer's own, so they overlap this layer's experts without delaying them.
        guess = self.route_next(x)[1].cpu() if self.route_next is not None else None
        out = self._compute(x, topk_weights, topk_ids)
        if guess is not None:
            self.prefetch_next(guess)
        return out

    def _compute(self, x, topk_weights, topk_ids):
        needed = sorted(topk_ids.unique().tolist(), key=lambda e: e not in self.slot_of)  # cached ones first
        # CUDA: resident's grouped kernel over the slots, with its output rows (so rounds give resident's sums)
        if x.is_cuda:
            from nanovllm.kernels.grouped_moe import grouped_moe_pairs, pair_rows, sum_pair_rows
            pairs = pair_rows(topk_ids, self.num_experts, self.w2_slots, x.dtype)
        else:
            out = torch.zeros_like(x)
        for start in range(0, len(needed), self.num_slots):  # in rounds when a step needs more than fit
            group = set(needed[start:start + self.num_slots])
            for expert in group:
                if expert in self.slot_of:
                    self.hits += 1
                    self.prefetch_hits += expert in self.prefetched
                    self.prefetched.discard(expert)
                else:
                    self.misses += 1
                self._make_resident(expert, keep=group)
                if expert in self.copied:
                    torch.cuda.current_stream().wait_event(self.copied[expert])
            if x.is_cuda:
                slot_of_expert = [self.slot_of[e] if e in group else self.num_slots for e in range(self.num_experts)]
                # pinned and non-blocking: the host must not wait here, or the next copy would start late
                table = torch.tensor(slot_of_expert, pin_memory=True).to(x.device, non_blocking=True)
                slot_ids = table[topk_ids]  # num_slots: not this round
                grouped_moe_pairs(x, self.w13_slots, self.w2_slots, topk_weights, slot_ids, pairs)
                self.slots_read = torch.cuda.Event()
                self.slots_read.record()
            else:
                grouped_experts(x, topk_weights, topk_ids, self._slot_weights, out, only=group)
        return sum_pair_rows(pairs, x.size(0), x.dtype) if x.is_cuda else out

    def _slot_weights(self, expert: int):
        slot = self.slot_of[expert]
        return self.w13_slots[slot], self.w2_slots[slot]


@hookimpl
def register_expert_managers(register):
    register(ResidentExperts)
    register(OffloadedExperts)


@hookimpl
def register_options(register):
    register("offload_experts_per_layer", None, "expert_manager='offload': device cache slots per MoE layer")
    register("offload_cache_gib", None, "expert_manager='offload': device memory for all layers' cached experts")
