"""The LLM API end to end on a tiny checkpoint: sampling, accounting, bad input, errors that name the fix."""
import json
import logging
import os
import shutil

import numpy as np
import torch
import pytest
from safetensors.torch import load_file, save_file

from nanovllm import LLM, SamplingParams

OPTIONS = dict(kvcache_block_size=8, max_model_len=128, max_num_seqs=16, max_num_batched_tokens=128)


@pytest.fixture(scope="module")
def llm(tiny_checkpoint):
    engine = LLM(tiny_checkpoint("qwen3"), **OPTIONS)
    yield engine
    engine.exit()


def assert_all_blocks_released(llm):
    """Every block is free or held only by the prefix cache: no reference is left."""
    manager = llm.scheduler.block_manager
    assert [b.block_id for b in manager.blocks if b.ref_count] == []
    assert manager.num_free_blocks == len(manager.blocks)
    assert llm.scheduler.is_finished()


def test_strings_and_token_ids_in_prompt_order(llm):
    prompts = ["Hello, world!", [5, 6, 7], "The quick brown fox", [9] * 20]
    greedy = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    batch = llm.generate(prompts, greedy, use_tqdm=False)
    alone = [llm.generate([p], greedy, use_tqdm=False)[0] for p in prompts]
    assert [o["token_ids"] for o in batch] == [o["token_ids"] for o in alone]
    for output in batch:
        assert len(output["token_ids"]) == 6 and output["finish_reason"] == "length"
        assert output["text"] == llm.tokenizer.decode(output["token_ids"], skip_special_tokens=True)
    assert_all_blocks_released(llm)


def test_seeded_request_reproducible_whatever_the_batch(llm):
    seeded = SamplingParams(temperature=1.0, max_tokens=12, seed=1234, ignore_eos=True)
    alone = llm.generate([[1, 2, 3]], seeded, use_tqdm=False)[0]["token_ids"]
    others = [[7, 8], [40] * 30, [3]]
    mixed = llm.generate(others + [[1, 2, 3]],
                         [SamplingParams(temperature=1.0, max_tokens=20, ignore_eos=True)] * 3 + [seeded],
                         use_tqdm=False)[-1]["token_ids"]
    assert alone == mixed
    other_seed = llm.generate([[1, 2, 3]], SamplingParams(temperature=1.0, max_tokens=12, seed=99, ignore_eos=True),
                              use_tqdm=False)[0]["token_ids"]
    assert other_seed != alone


def test_per_request_params_honoured(llm):
    prompt = [11, 12, 13, 14]
    greedy_alone = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=10, ignore_eos=True),
                                use_tqdm=False)[0]["token_ids"]
    stop_token = greedy_alone[3]
    params = [SamplingParams(temperature=0, max_tokens=10, ignore_eos=True),
              SamplingParams(temperature=0, max_tokens=3, ignore_eos=True),
              SamplingParams(temperature=0, max_tokens=10, stop_token_ids=[stop_token]),
              SamplingParams(temperature=1.5, top_k=1, max_tokens=10, ignore_eos=True)]
    outputs = llm.generate([prompt] * 4, params, use_tqdm=False)
    assert outputs[0]["token_ids"] == greedy_alone
    assert outputs[1]["token_ids"] == greedy_alone[:3] and outputs[1]["finish_reason"] == "length"
    cut = greedy_alone.index(stop_token) + 1
    assert outputs[2]["token_ids"] == greedy_alone[:cut] and outputs[2]["finish_reason"] == "stop"
    assert outputs[3]["token_ids"] == greedy_alone  # top_k=1 samples the argmax whatever the temperature


def test_eos_stops_unless_ignored(tiny_checkpoint):
    path = tiny_checkpoint("qwen3")
    probe = LLM(path, **OPTIONS)
    first = probe.generate([[1, 2]], SamplingParams(temperature=0, max_tokens=1), use_tqdm=False)[0]["token_ids"][0]
    probe.exit()
    # Make the greedy first token the model's eos: generation stops right there unless ignore_eos.
    config_path = os.path.join(path, "config.json")
    tmp = path + "-eos"
    shutil.copytree(path, tmp)
    config = json.load(open(config_path))
    config["eos_token_id"] = first
    json.dump(config, open(os.path.join(tmp, "config.json"), "w"))
    llm = LLM(tmp, **OPTIONS)
    stopped, ignored = llm.generate([[1, 2], [1, 2]], [SamplingParams(temperature=0, max_tokens=5),
                                                       SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)],
                                    use_tqdm=False)
    assert stopped["token_ids"] == [first] and stopped["finish_reason"] == "stop"
    assert len(ignored["token_ids"]) == 5
    llm.exit()


def test_generation_stops_at_max_model_len(llm):
    output = llm.generate([[3] * 120], SamplingParams(temperature=0, max_tokens=50, ignore_eos=True),
                          use_tqdm=False)[0]
    assert len(output["token_ids"]) == 8 and output["finish_reason"] == "length"


def test_prefix_cache_hits_counted(llm):
    manager = llm.scheduler.block_manager
    prompt = list(range(100, 140))  # 5 full blocks of 8
    llm.generate([prompt], SamplingParams(temperature=0, max_tokens=2), use_tqdm=False)
    hits_before, queries_before = manager.num_hit_blocks, manager.num_queried_blocks
    output = llm.generate([prompt + [1, 2, 3]], SamplingParams(temperature=0, max_tokens=2), use_tqdm=False)[0]
    assert output["num_cached_tokens"] == 40
    assert manager.num_hit_blocks - hits_before == 5
    assert manager.num_queried_blocks - queries_before == 5
    assert_all_blocks_released(llm)


def test_chat_applies_template(llm):
    messages = [{"role": "user", "content": "Hello"}]
    greedy = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    chat = llm.chat([messages], greedy, use_tqdm=False)[0]
    templated = llm.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert templated.endswith("<|im_start|>assistant\n")
    assert chat["token_ids"] == llm.generate([templated], greedy, use_tqdm=False)[0]["token_ids"]


@pytest.mark.parametrize("prompt, params, message", [
    ([[]], SamplingParams(), "prompt is empty"),
    ([[1] * 129], SamplingParams(), "max_model_len=128"),
    ([[1, 512]], SamplingParams(), "token id 512 is outside the vocabulary"),
    ([[1, -1]], SamplingParams(), "token id -1"),
    (["ok", ""], SamplingParams(), "prompt is empty"),
    ([[1, 2]], [SamplingParams(), SamplingParams()], "2 sampling params for 1 prompts"),
])
def test_bad_prompt_is_rejected_and_engine_stays_usable(llm, prompt, params, message):
    with pytest.raises(ValueError, match=message):
        llm.generate(prompt, params, use_tqdm=False)
    assert llm.scheduler.is_finished()  # nothing half-queued
    output = llm.generate([[1, 2]], SamplingParams(temperature=0, max_tokens=2), use_tqdm=False)[0]
    assert len(output["token_ids"]) == 2
    assert_all_blocks_released(llm)


@pytest.mark.parametrize("kwargs, message", [
    (dict(temperature=-0.5), "temperature=-0.5"),
    (dict(max_tokens=0), "max_tokens=0"),
    (dict(top_p=0.0), "top_p=0.0"),
    (dict(top_k=0), "top_k=0"),
])
def test_bad_sampling_params(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)


def test_unknown_option_lists_known_ones(tiny_checkpoint):
    with pytest.raises(TypeError, match=r"unknown option\(s\) 'max_seq_len'.*known options: .*max_model_len"):
        LLM(tiny_checkpoint("qwen3"), max_seq_len=10)


def test_missing_model_folder():
    with pytest.raises(FileNotFoundError, match="model folder '/nonexistent/model' does not exist"):
        LLM("/nonexistent/model")


def _copy_with_tensors(path, dest, edit):
    shutil.copytree(path, dest)
    tensors = load_file(os.path.join(dest, "model.safetensors"))
    edit(tensors)
    save_file(tensors, os.path.join(dest, "model.safetensors"), metadata={"format": "pt"})
    return str(dest)


def test_missing_tensor_names_itself(tiny_checkpoint, tmp_path):
    path = _copy_with_tensors(tiny_checkpoint("qwen3"), tmp_path / "m",
                              lambda t: t.pop("model.layers.1.self_attn.k_proj.weight"))
    with pytest.raises(ValueError, match=r"lacks tensor\(s\) for: model\.layers\.1\.self_attn\.k_proj\.weight"):
        LLM(path, **OPTIONS)


def test_mismatched_tensor_names_itself(tiny_checkpoint, tmp_path):
    def shrink(tensors):
        tensors["model.layers.0.mlp.down_proj.weight"] = tensors["model.layers.0.mlp.down_proj.weight"][:, :7].contiguous()
    path = _copy_with_tensors(tiny_checkpoint("qwen3"), tmp_path / "m", shrink)
    with pytest.raises(ValueError, match=r"'model\.layers\.0\.mlp\.down_proj\.weight': checkpoint shape \(64, 7\) does not match"):
        LLM(path, **OPTIONS)


def test_unsupported_architecture_lists_installed(tiny_checkpoint, tmp_path):
    dest = tmp_path / "m"
    shutil.copytree(tiny_checkpoint("qwen3"), dest)
    config = json.load(open(dest / "config.json"))
    config["architectures"] = ["GPT2LMHeadModel"]
    json.dump(config, open(dest / "config.json", "w"))
    with pytest.raises(ValueError, match=r"GPT2LMHeadModel.*not supported.*Qwen3ForCausalLM.*plugin"):
        LLM(str(dest), **OPTIONS)


def test_kv_cache_too_small_for_max_model_len(tiny_checkpoint):
    with pytest.raises(ValueError, match="fewer than max_model_len=128"):
        LLM(tiny_checkpoint("qwen3"), kvcache_block_size=8, max_model_len=128, num_kvcache_blocks=4)


def test_async_scheduling_gives_the_same_tokens(tiny_checkpoint):
    """Reading sampled tokens one step late changes nothing: stops, lengths and preemption included."""
    path = tiny_checkpoint("qwen3")
    prompts = [[5, 6, 7], [40] * 30, [3], list(range(60, 120))]
    probe = LLM(path, **OPTIONS)
    stop = probe.generate([prompts[0]], SamplingParams(temperature=0, max_tokens=6), use_tqdm=False)[0]["token_ids"][2]
    probe.exit()
    params = [SamplingParams(temperature=0, max_tokens=6, stop_token_ids=[stop]),
              SamplingParams(temperature=0, max_tokens=20, ignore_eos=True),
              SamplingParams(temperature=0.8, max_tokens=9, seed=7, ignore_eos=True),
              SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)]
    results = {}
    for async_scheduling in (True, False):
        llm = LLM(path, **{**OPTIONS, "num_kvcache_blocks": 16}, async_scheduling=async_scheduling)
        results[async_scheduling] = llm.generate(prompts, params, use_tqdm=False)
        assert llm.scheduler.num_preemptions > 0
        assert_all_blocks_released(llm)
        llm.exit()
    assert results[True] == results[False]
    assert results[True][0]["finish_reason"] == "stop" and results[True][0]["token_ids"][-1] == stop


# ---------------------------------------------------------------- as vLLM users write it

def test_prompt_forms_of_vllm(llm):
    greedy = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    ids = llm.tokenizer.encode("Hello, world!")
    expected = llm.generate(["Hello, world!"], greedy, use_tqdm=False)[0]["token_ids"]
    for prompt in ["Hello, world!", ids, np.array(ids), {"prompt": "Hello, world!"}, {"prompt_token_ids": ids}]:
        outputs = llm.generate(prompt, greedy, use_tqdm=False)
        assert len(outputs) == 1 and outputs[0]["token_ids"] == expected, prompt
    mixed = llm.generate([{"prompt": "Hello, world!"}, ids, "Hello, world!"], greedy, use_tqdm=False)
    assert [o["token_ids"] for o in mixed] == [expected] * 3
    assert llm.generate([], greedy, use_tqdm=False) == []
    with pytest.raises(ValueError, match=r"one key, 'prompt' \(text\) or 'prompt_token_ids'; got \['text'\]"):
        llm.generate({"text": "Hi"}, greedy, use_tqdm=False)


def test_chat_takes_one_conversation_template_kwargs_and_generation_prompt(llm):
    messages = [{"role": "user", "content": "Hello"}]
    greedy = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)
    seen = []
    generate = llm.generate
    llm.generate = lambda prompts, *args: seen.append(prompts) or generate(prompts, *args)
    try:
        one = llm.chat(messages, greedy, use_tqdm=False)
        llm.chat(messages, greedy, use_tqdm=False, chat_template_kwargs={"enable_thinking": False})
        llm.chat(messages, greedy, use_tqdm=False, add_generation_prompt=False)
    finally:
        del llm.generate
    assert len(one) == 1 and one == llm.chat([messages], greedy, use_tqdm=False)
    assert seen[0][0].endswith("<|im_start|>assistant\n")
    assert seen[1][0].endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert seen[2][0].endswith("Hello<|im_end|>\n")


def test_engine_seed_makes_sampling_repeatable(tiny_checkpoint):
    params = SamplingParams(temperature=1.0, max_tokens=8, ignore_eos=True)
    runs = []
    for seed in (7, 7, 8):
        with LLM(tiny_checkpoint("qwen3"), seed=seed, **OPTIONS) as engine:
            runs.append([o["token_ids"] for o in engine.generate([[1, 2, 3], [4, 5]], params, use_tqdm=False)])
    assert runs[0] == runs[1] != runs[2]
    with pytest.raises(ValueError, match="seed=-1 is outside"):
        LLM(tiny_checkpoint("qwen3"), seed=-1)


def test_max_model_len_defaults_to_the_model_and_is_lowered_to_the_cache(tiny_checkpoint, caplog):
    path = tiny_checkpoint("qwen3")  # max_position_embeddings 512
    with LLM(path, kvcache_block_size=8) as engine:
        assert engine.config.max_model_len == 512
    with caplog.at_level(logging.WARNING, logger="nanovllm"):
        with LLM(path, kvcache_block_size=8, num_kvcache_blocks=12) as engine:
            assert engine.config.max_model_len == 96
            assert engine.generate([[1] * 90], SamplingParams(max_tokens=20), use_tqdm=False)[0]["finish_reason"]
    assert "max_model_len lowered from 512 (the model's maximum) to 96, what the KV cache holds (12 blocks of 8)" \
        in caplog.text
    with pytest.raises(ValueError, match="the KV cache holds 96 tokens .* fewer than max_model_len=128"):
        LLM(path, kvcache_block_size=8, num_kvcache_blocks=12, max_model_len=128)


def fill_hub_cache(cache, repo_id: str, checkpoint: str) -> str:
    """What huggingface_hub leaves after a download: models--owner--name/snapshots/COMMIT and refs/main."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    shutil.copytree(checkpoint, repo / "snapshots" / "0123abcd")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abcd")
    return str(repo / "snapshots" / "0123abcd")


def test_a_hub_id_resolves_from_the_cache_offline(tiny_checkpoint, tmp_path, monkeypatch):
    from huggingface_hub import constants
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "default-cache"))
    path = tiny_checkpoint("qwen3")
    greedy = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    with LLM(path, **OPTIONS) as local:
        expected = local.generate([[1, 2, 3]], greedy, use_tqdm=False)
    snapshot = fill_hub_cache(tmp_path / "default-cache", "acme/tiny-qwen3", path)
    with LLM("acme/tiny-qwen3", **OPTIONS) as engine:  # the default cache
        assert engine.config.model == snapshot
        assert engine.generate([[1, 2, 3]], greedy, use_tqdm=False) == expected
    other = fill_hub_cache(tmp_path / "mine", "acme/tiny-2", path)
    with LLM("acme/tiny-2", download_dir=str(tmp_path / "mine"), **OPTIONS) as engine:
        assert engine.config.model == other
    with pytest.raises(FileNotFoundError, match="'acme/absent' is not a local folder nor in the Hugging Face cache "
                                                ".*HF_HUB_OFFLINE is set"):
        LLM("acme/absent")
    partial = tmp_path / "partial"  # what loading a config alone leaves: no weights, so not the model
    os.makedirs(partial)
    shutil.copy(os.path.join(path, "config.json"), partial / "config.json")
    fill_hub_cache(tmp_path / "default-cache", "acme/config-only", str(partial))
    with pytest.raises(FileNotFoundError, match="'acme/config-only' is not a local folder nor in the Hugging Face"):
        LLM("acme/config-only")
    with pytest.raises(FileNotFoundError, match="model folder 'no/such/folder' does not exist"):
        LLM("no/such/folder")


def test_an_unreachable_hub_is_a_clear_error(tmp_path, monkeypatch):
    from huggingface_hub import constants
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    with pytest.raises(FileNotFoundError, match="'acme/absent' is not a local folder nor in the Hugging Face cache "
                                                ".* and the hub could not provide it"):
        LLM("acme/absent", download_dir=str(tmp_path))


def test_penalties_and_min_tokens_greedy_match_transformers_generate(tiny_checkpoint):
    """Greedy generation with a repetition penalty and min_tokens equals transformers' generate with the same."""
    from transformers import AutoModelForCausalLM
    path = tiny_checkpoint("qwen3")
    hf = AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32)
    prompts = [[5, 6, 7, 5, 6, 7, 5, 6], [40, 41] * 6]
    with LLM(path, **OPTIONS) as llm:
        eos = llm.tokenizer.eos_token_id
        # each prompt's first greedy token ends it, unless min_tokens holds it back
        stops = [o["token_ids"][0] for o in llm.generate(prompts, SamplingParams(temperature=0, max_tokens=1),
                                                         use_tqdm=False)]
        for params, hf_options in [
            (dict(repetition_penalty=1.5), dict(repetition_penalty=1.5)),
            (dict(min_tokens=5, stop_token_ids=stops), dict(min_new_tokens=5)),
        ]:
            sampling = SamplingParams(temperature=0, **{"max_tokens": 10, **params})
            got = [o["token_ids"] for o in llm.generate(prompts, sampling, use_tqdm=False)]
            for prompt, tokens in zip(prompts, got):
                ends = [eos, *stops] if "min_tokens" in params else eos
                out = hf.generate(torch.tensor([prompt]), do_sample=False, eos_token_id=ends, pad_token_id=eos,
                                  **{"max_new_tokens": 10, **hf_options})
                assert tokens == out[0, len(prompt):].tolist(), params
                assert len(tokens) >= 5 if "min_tokens" in params else True


def test_presence_and_frequency_penalties_push_repeats_away(llm):
    prompt = [9, 9, 9, 9]
    plain = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=24, ignore_eos=True), use_tqdm=False)
    pushed = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=24, ignore_eos=True,
                                                   frequency_penalty=2.0, presence_penalty=2.0), use_tqdm=False)
    assert len(set(pushed[0]["token_ids"])) > len(set(plain[0]["token_ids"]))


def test_stop_strings_across_token_boundaries(llm):
    greedy = dict(temperature=0, max_tokens=16, ignore_eos=True)
    plain = llm.generate(["The quick"], SamplingParams(**greedy), use_tqdm=False)[0]
    pieces = [llm.tokenizer.decode(plain["token_ids"][:i]) for i in range(1, 17)]
    # the first boundary between two tokens of some text each: a stop string from the last character of one
    # token to the first of the next
    k = next(i for i in range(1, 12) if pieces[i - 1] and len(pieces[i]) > len(pieces[i - 1]))
    stop = pieces[k - 1][-1] + pieces[k][len(pieces[k - 1])]
    cut = pieces[k].find(stop)
    for include in (False, True):
        out = llm.generate(["The quick"], SamplingParams(**greedy, stop=["never there", stop],
                                                         include_stop_str_in_output=include), use_tqdm=False)[0]
        assert out["finish_reason"] == "stop"
        assert out["text"] == pieces[k][:cut + (len(stop) if include else 0)]
        assert out["token_ids"] == plain["token_ids"][:k + 1]
    assert_all_blocks_released(llm)
    with pytest.raises(ValueError, match="must be non-empty strings"):
        SamplingParams(stop=["ok", ""])


def test_n_samples_share_the_prompt_blocks(llm):
    prompt = list(range(30, 50))  # 20 tokens: two full blocks of 8
    params = SamplingParams(n=3, temperature=1.0, seed=5, max_tokens=6, ignore_eos=True)
    first, again = (llm.generate([prompt, [7, 8]], [params, SamplingParams(max_tokens=2)], use_tqdm=False)
                    for _ in range(2))
    assert "outputs" not in first[1]  # n = 1: the shape as before
    samples = first[0]["outputs"]
    assert len(samples) == 3 and {k: first[0][k] for k in samples[0]} == samples[0]
    assert len({tuple(s["token_ids"]) for s in samples}) > 1  # each sample draws its own
    assert [s["token_ids"] for s in again[0]["outputs"]] == [s["token_ids"] for s in samples]  # seeded: the same
    assert [s["num_cached_tokens"] >= 16 for s in samples[1:]] == [True, True]
    assert_all_blocks_released(llm)


@pytest.mark.parametrize("tp", [1, 2])
def test_logprobs_are_the_models_log_softmax(tiny_checkpoint, tp):
    from transformers import AutoModelForCausalLM
    path = tiny_checkpoint("qwen3")
    hf = AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32)
    prompts = [[5, 6, 7, 8], [40, 41, 42]]
    with LLM(path, tensor_parallel_size=tp, **OPTIONS) as engine:
        outputs = engine.generate(prompts, [SamplingParams(temperature=0, max_tokens=5, ignore_eos=True, logprobs=3),
                                            SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)],
                                  use_tqdm=False)
    assert "logprobs" not in outputs[1]
    tokens, logprobs = outputs[0]["token_ids"], outputs[0]["logprobs"]
    assert len(logprobs) == len(tokens) == 5
    with torch.no_grad():
        reference = torch.log_softmax(hf(torch.tensor([prompts[0] + tokens])).logits[0, 3:-1], dim=-1)
    for step, (token, entry) in enumerate(zip(tokens, logprobs)):
        top = reference[step].topk(3)
        assert set(entry) == set(top.indices.tolist()) | {token}  # greedy: the sampled token is the top one
        for token_id, value in entry.items():
            assert abs(value - reference[step, token_id].item()) < 1e-4
    with pytest.raises(ValueError, match="logprobs=21 is outside"):
        SamplingParams(logprobs=21)


@pytest.mark.parametrize("tp", [1, 2])
def test_prompt_logprobs_are_the_models_log_softmax(tiny_checkpoint, tp):
    from transformers import AutoModelForCausalLM
    path = tiny_checkpoint("qwen3")
    hf = AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32)
    long_prompt = [(7 * i) % 200 + 3 for i in range(40)]  # chunked: 40 tokens over steps of 16
    prompts = [long_prompt, [40, 41, 42], long_prompt]
    asking = SamplingParams(temperature=0, max_tokens=2, prompt_logprobs=2)
    options = {**OPTIONS, "max_num_batched_tokens": 16}
    with LLM(path, tensor_parallel_size=tp, **options) as engine:
        engine.generate([long_prompt], SamplingParams(max_tokens=1), use_tqdm=False)  # now in the prefix cache
        outputs = engine.generate(prompts, [asking, asking, SamplingParams(temperature=0, max_tokens=2)],
                                  use_tqdm=False)
        assert_all_blocks_released(engine)
    assert outputs[0]["num_cached_tokens"] == 0  # every prompt position is computed
    assert outputs[2]["num_cached_tokens"] > 0 and "prompt_logprobs" not in outputs[2]
    for prompt, output in zip(prompts, outputs[:2]):
        entries = output["prompt_logprobs"]
        assert len(entries) == len(prompt) and entries[0] is None
        with torch.no_grad():
            reference = torch.log_softmax(hf(torch.tensor([prompt])).logits[0, :-1], dim=-1)
        for position, entry in enumerate(entries[1:]):
            top = reference[position].topk(2)
            assert set(entry) == set(top.indices.tolist()) | {prompt[position + 1]}
            for token_id, value in entry.items():
                assert abs(value - reference[position, token_id].item()) < 1e-4
    with pytest.raises(ValueError, match="prompt_logprobs=-1 is outside"):
        SamplingParams(prompt_logprobs=-1)


def test_a_request_finished_in_its_first_step_leaves_its_prompt_cached(llm):
    prompt = list(range(60, 80))  # two full blocks of 8
    first, again = (llm.generate([prompt], SamplingParams(max_tokens=1), use_tqdm=False)[0] for _ in range(2))
    assert first["num_cached_tokens"] == 0 and again["num_cached_tokens"] == 16
    assert_all_blocks_released(llm)


def test_n_samples_do_not_hold_up_other_prompts(llm):
    steps = []
    step = llm.step
    llm.step = lambda: steps.append(1) or step()
    try:
        prompts = [[i + 3] * 20 for i in range(8)]
        steps.clear()
        llm.generate(prompts, SamplingParams(n=2, max_tokens=2, ignore_eos=True), use_tqdm=False)
        with_n = len(steps)
        steps.clear()
        llm.generate(prompts + [[i + 50] * 20 for i in range(8)], SamplingParams(max_tokens=2, ignore_eos=True),
                     use_tqdm=False)
    finally:
        del llm.step
    assert with_n <= len(steps) + 2, (with_n, len(steps))


def test_profiler_folder_gets_each_ranks_table(tiny_checkpoint, tmp_path, monkeypatch):
    with LLM(tiny_checkpoint("qwen3"), tensor_parallel_size=2, **OPTIONS):  # ranks fork from a server started now
        pass
    monkeypatch.setenv("NANOVLLM_TORCH_PROFILER_DIR", str(tmp_path))  # which the next engine's ranks must see
    with LLM(tiny_checkpoint("qwen3"), tensor_parallel_size=2, **OPTIONS) as engine:
        engine.generate([[5, 6, 7]], SamplingParams(max_tokens=3), use_tqdm=False)
    for rank in (0, 1):
        table = (tmp_path / f"rank{rank}.txt").read_text()
        assert "aten::mm" in table and "Self CPU" in table
