"""Expert managers on their own: the offloaded LRU cache's accounting, and its outputs against resident experts."""
from types import SimpleNamespace

import pytest
import torch

from nanovllm.default_plugins.expert_managers import OffloadedExperts, ResidentExperts

NAMES = {"gate_proj": "gate", "up_proj": "up", "down_proj": "down"}
E, H, I = 4, 8, 16


def config(**options):
    return SimpleNamespace(plugin_options=options, hf_config=SimpleNamespace(num_experts_per_tok=2, num_hidden_layers=2))


def managers(**options):
    torch.manual_seed(0)
    resident = ResidentExperts(E, H, I, NAMES, config())
    offloaded = OffloadedExperts(E, H, I, NAMES, config(**options))
    for expert in range(E):
        for name, shape in (("gate_proj", (I, H)), ("up_proj", (I, H)), ("down_proj", (H, I))):
            tensor = torch.randn(shape)
            resident.load_checkpoint_tensor(f"{expert}.{name}.weight", tensor)
            offloaded.load_checkpoint_tensor(f"{expert}.{name}.weight", tensor)
    return resident, offloaded


def run(manager, ids):
    ids = torch.tensor(ids)
    x = torch.randn(ids.size(0), H, generator=torch.Generator().manual_seed(1))
    return manager(x, torch.full(ids.shape, 0.5), ids)


def counters(manager):
    return manager.hits, manager.misses, manager.evictions


def test_lru_accounting():
    _, cache = managers(offload_experts_per_layer=2)
    run(cache, [[0, 1]])
    assert counters(cache) == (0, 2, 0)
    run(cache, [[0, 0]])
    assert counters(cache) == (1, 2, 0)  # 0 is now the most recently used
    run(cache, [[2, 2]])
    assert counters(cache) == (1, 3, 1) and list(cache.slot_of) == [0, 2]  # 1 was evicted
    run(cache, [[1, 2]])
    assert counters(cache) == (2, 4, 2) and set(cache.slot_of) == {1, 2}  # 0 out, 2 kept: both needed now


def test_prefetch_makes_the_next_call_hit():
    _, cache = managers(offload_experts_per_layer=2)
    cache.prefetch(torch.tensor([[3, 1]]))
    assert cache.prefetches == 2 and set(cache.slot_of) == {1, 3}
    run(cache, [[3, 1]])
    assert counters(cache) == (2, 0, 0) and cache.prefetch_hits == 2


def test_prefetch_takes_the_most_likely_experts_that_fit():
    _, cache = managers(offload_experts_per_layer=1)
    cache.prefetch(torch.tensor([[2, 0], [2, 1], [3, 2]]))
    assert cache.prefetches == 1 and list(cache.slot_of) == [2]
    run(cache, [[0, 2]])  # rounds of one slot: the prefetched 2 first, then 0 copied over it
    assert counters(cache) == (1, 1, 1) and cache.prefetch_hits == 1 and list(cache.slot_of) == [0]


@pytest.mark.parametrize("slots", [1, 2, 4])
def test_offloaded_output_equals_resident(slots):
    resident, cache = managers(offload_experts_per_layer=slots)
    ids = [[0, 3], [1, 3], [2, 0], [3, 3]]
    assert torch.allclose(run(cache, ids), run(resident, ids), atol=1e-6)


def test_cache_size_from_a_memory_budget():
    expert_bytes = 3 * I * H * 4
    _, cache = managers(offload_cache_gib=3 * 2 * expert_bytes / 2**30)  # 3 experts per layer, 2 layers
    assert cache.num_slots == 3
    with pytest.raises(ValueError, match="holds 0 experts per layer"):
        managers(offload_cache_gib=expert_bytes / 2**30)


def test_missing_and_misnamed_expert_tensors():
    manager = ResidentExperts(E, H, I, NAMES, config())
    manager.load_checkpoint_tensor("0.gate_proj.weight", torch.zeros(I, H))
    assert "0.up_proj.weight" in manager.missing_checkpoint_tensors()
    assert "0.gate_proj.weight" not in manager.missing_checkpoint_tensors()
    with pytest.raises(ValueError, match="no expert weight is named '9.gate_proj.weight'"):
        manager.load_checkpoint_tensor("9.gate_proj.weight", torch.zeros(I, H))
    with pytest.raises(ValueError, match=r"checkpoint shape \(16, 7\) does not match"):
        manager.load_checkpoint_tensor("1.up_proj.weight", torch.zeros(I, 7))
