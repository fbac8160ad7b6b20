"""Input that used to give silent wrong output: every value is checked and named, arrays are prompts too, a
checkpoint without a tokenizer fails at load, and generate from several threads gives each call its own output."""
import math
import shutil
import threading

import numpy as np
import pytest
import torch

from nanovllm import LLM, SamplingParams
from nanovllm.cli import main as cli
from nanovllm.config import Config

OPTIONS = dict(kvcache_block_size=8, max_model_len=128, max_num_seqs=16, max_num_batched_tokens=128)
GREEDY = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)


@pytest.fixture(scope="module")
def llm(tiny_checkpoint):
    engine = LLM(tiny_checkpoint("qwen3"), **OPTIONS)
    yield engine
    engine.exit()


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(temperature=float("nan")), ValueError, "temperature=nan is not a finite number"),
    (dict(temperature=math.inf), ValueError, "temperature=inf is not a finite number"),
    (dict(temperature="0.5"), TypeError, "temperature='0.5' is a str; give a number"),
    (dict(top_p=float("nan")), ValueError, "top_p=nan"),
    (dict(top_p=None), TypeError, "top_p=None is a NoneType"),
    (dict(top_k=2.5), TypeError, "top_k=2.5 is a float; give an integer"),
    (dict(max_tokens=2.5), TypeError, "max_tokens=2.5 is a float; give an integer"),
    (dict(max_tokens=True), TypeError, "max_tokens=True is a bool"),
    (dict(stop_token_ids="12"), TypeError, "stop_token_ids='12' is a string"),
    (dict(stop_token_ids=["a"]), TypeError, "stop_token_ids='a' is a str"),
    (dict(stop_token_ids=[-3]), ValueError, "holds a negative id"),
    (dict(seed=2**64), ValueError, "seed=18446744073709551616 is outside"),
    (dict(seed=-1), ValueError, "seed=-1 is outside"),
    (dict(seed=1.5), TypeError, "seed=1.5 is a float"),
    (dict(ignore_eos="yes"), TypeError, "ignore_eos='yes' is a str"),
])
def test_sampling_params_name_the_bad_value(kwargs, error, message):
    with pytest.raises(error, match=message.replace("(", r"\(").replace("[", r"\[")):
        SamplingParams(**kwargs)


def test_numpy_numbers_are_accepted_as_python_ones():
    params = SamplingParams(temperature=np.float32(0.5), top_k=np.int64(3), max_tokens=np.int32(4), seed=np.uint64(7),
                            stop_token_ids=np.array([5, 6]))
    assert (params.temperature, params.top_k, params.max_tokens, params.seed, params.stop_token_ids) == (0.5, 3, 4, 7,
                                                                                                         (5, 6))
    assert all(type(v) in (int, float) for v in (params.temperature, params.top_k, params.max_tokens, params.seed))


@pytest.mark.parametrize("options, error, message", [
    (dict(gpu_memory_utilization="0.5"), TypeError, "gpu_memory_utilization='0.5' is a str"),
    (dict(gpu_memory_utilization=float("nan")), ValueError, "gpu_memory_utilization=nan is not a finite number"),
    (dict(kv_cache_memory_gib=-1), ValueError, "kv_cache_memory_gib=-1.0 must be positive"),
    (dict(max_num_seqs=True), ValueError, "max_num_seqs=True must be a positive integer"),
    (dict(num_kvcache_blocks=2.5), TypeError, "num_kvcache_blocks=2.5 is a float"),
    (dict(enforce_eager="no"), TypeError, "enforce_eager='no' is a str; give True or False"),
    (dict(long_prefill_token_threshold=-1), ValueError, "long_prefill_token_threshold=-1 must be a non-negative"),
    (dict(long_prefill_token_threshold=256, enable_chunked_prefill=False, max_num_batched_tokens=4096,
          max_model_len=4096), ValueError, "long_prefill_token_threshold=256 .* needs enable_chunked_prefill=True"),
])
def test_engine_options_name_the_bad_value(tiny_checkpoint, options, error, message):
    with pytest.raises(error, match=message):
        Config.from_options(tiny_checkpoint("qwen3"), **options)


def test_prompts_as_numpy_or_torch_integer_arrays(llm):
    prompt = [5, 6, 7, 8, 9]
    expected = llm.generate([prompt], GREEDY, use_tqdm=False)[0]["token_ids"]
    for array in (np.array(prompt), np.array(prompt, dtype=np.int32), torch.tensor(prompt),
                  torch.tensor(prompt, dtype=torch.int32), [np.int64(t) for t in prompt]):
        assert llm.generate([array], GREEDY, use_tqdm=False)[0]["token_ids"] == expected
    assert [o["token_ids"] for o in llm.generate(np.array([prompt, prompt]), GREEDY, use_tqdm=False)] == [expected] * 2


@pytest.mark.parametrize("prompt, message", [
    ([1, 2.5, 3], "token id 2.5 is a float; token ids are integers"),
    ([1, None], "token id None is a NoneType"),
    ([1, True], "token id True is a bool"),
    (np.array([1.0, 2.0]), "token id 1.0 is a float"),
    (torch.tensor([[1, 2]]), r"token id \[1, 2\] is a list"),
    ({1, 2}, "a prompt must be a string or a list of token ids, not set"),
])
def test_bad_token_lists_say_what_is_wrong(llm, prompt, message):
    with pytest.raises(TypeError, match=message):
        llm.generate([prompt], GREEDY, use_tqdm=False)
    assert llm.scheduler.is_finished()


def test_stop_token_ids_outside_the_vocabulary_are_refused_at_generate(llm):
    with pytest.raises(ValueError, match="token id 512 is outside the vocabulary .* check stop_token_ids"):
        llm.generate([[1, 2], [3, 4]], [GREEDY, SamplingParams(stop_token_ids=[512])], use_tqdm=False)
    assert llm.scheduler.is_finished()
    assert len(llm.generate([[1, 2]], GREEDY, use_tqdm=False)[0]["token_ids"]) == 6


def test_cli_refuses_a_nan_temperature(tiny_checkpoint, capsys):
    assert cli(["generate", tiny_checkpoint("qwen3"), "Hi", "--temperature", "nan"]) == 1
    assert "temperature=nan is not a finite number" in capsys.readouterr().err


def test_a_checkpoint_without_tokenizer_files_fails_at_load(tiny_checkpoint, tmp_path):
    path = tiny_checkpoint("qwen3")
    bare = tmp_path / "bare"
    shutil.copytree(path, bare, ignore=shutil.ignore_patterns("tokenizer*", "chat_template*", "special_tokens*"))
    with pytest.raises(FileNotFoundError, match=r"has no tokenizer files \(one of tokenizer.json.*pass tokenizer="):
        LLM(str(bare), **OPTIONS)
    llm = LLM(str(bare), **OPTIONS, tokenizer=path)
    assert llm.generate(["Hello"], GREEDY, use_tqdm=False)[0]["text"]
    llm.exit()


def test_generate_from_several_threads_gives_each_call_its_own_complete_output(llm):
    prompts = [[[i, i + 1, i + 2] for i in range(start, start + 8)] for start in (10, 50, 90, 130)]
    expected = [[o["token_ids"] for o in llm.generate(p, GREEDY, use_tqdm=False)] for p in prompts]
    results, errors = [None] * len(prompts), []

    def call(i):
        try:
            outputs = llm.generate(prompts[i], GREEDY, use_tqdm=False)
            assert all(o["finish_reason"] == "length" for o in outputs)
            results[i] = [o["token_ids"] for o in outputs]
        except Exception as exc:  # reported below, in the main thread
            errors.append(exc)
    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(prompts))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not errors and results == expected
    assert llm.scheduler.is_finished()


def test_an_error_in_one_thread_leaves_the_other_calls_alone(llm):
    good, bad_errors, good_outputs = [[1, 2, 3]] * 4, [], []
    expected = [o["token_ids"] for o in llm.generate(good, GREEDY, use_tqdm=False)]

    def good_call():
        good_outputs.append([o["token_ids"] for o in llm.generate(good, GREEDY, use_tqdm=False)])

    def bad_call():
        try:
            llm.generate([[1, 2], [1, 10**6]], GREEDY, use_tqdm=False)
        except ValueError as exc:
            bad_errors.append(exc)
    threads = [threading.Thread(target=f) for f in (good_call, bad_call, good_call)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert len(bad_errors) == 1 and good_outputs == [expected, expected]


# ---------------------------------------------------------------- errors that name the file, the size, the dimension

@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_an_unreadable_safetensors_file_is_named(tiny_checkpoint, tmp_path, damage):
    bad = tmp_path / damage
    shutil.copytree(tiny_checkpoint("qwen3"), bad)
    weights = bad / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[:len(data) // 2] if damage == "truncated" else b"\x00garbage" * 64)
    with pytest.raises(ValueError, match=f"{weights} is not a readable safetensors file .*truncated or corrupt"):
        LLM(str(bad), max_model_len=64)


def test_a_kv_cache_that_cannot_be_allocated_says_how_much_and_what_is_free(tiny_checkpoint):
    with pytest.raises(RuntimeError, match=r"the KV cache of 1000000000000 blocks \(\d+\.\d+ GiB\) cannot be "
                                           r"allocated on cpu, which has \d+\.\d+ GiB free"):
        LLM(tiny_checkpoint("qwen3"), max_model_len=64, num_kvcache_blocks=10**12)


@pytest.mark.parametrize("overrides, size, says", [
    ({}, 3, "does not divide this model's num_attention_heads=4: use one of [1, 2, 4]"),
    (dict(num_attention_heads=6, num_key_value_heads=3, head_dim=16), 2,
     "can neither split nor replicate this model's num_key_value_heads=3"),
    (dict(intermediate_size=126), 4, "does not divide this model's intermediate_size=126"),
])
def test_a_tensor_parallel_size_that_does_not_split_names_the_dimension(tiny_checkpoint, overrides, size, says):
    with pytest.raises(ValueError) as error:
        LLM(tiny_checkpoint("qwen3", **overrides), tensor_parallel_size=size, max_model_len=64)
    assert says in str(error.value)
