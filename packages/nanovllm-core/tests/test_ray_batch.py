"""Batch inference on a local Ray cluster (nanovllm.ray_batch, `nanovllm batch`): two workers give the outputs of one
in-process LLM, a worker killed mid-job loses and repeats no row, a bad row gets its own error, and a worker's
tensor-parallel ranks leave with it."""
import json
import os
import random
import signal
import sys
import time

import pytest

# Workers run this interpreter; under `uv run`, Ray would build them a copy of the workspace each session.
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
ray = pytest.importorskip("ray", reason="needs Ray Data: pip install 'nanovllm-core[ray]' (the workspace's dev group "
                                        "installs it)")
import pyarrow as pa  # noqa: E402  (after the skip: both come with Ray Data)
import pyarrow.parquet as pq  # noqa: E402

from nanovllm import LLM, SamplingParams  # noqa: E402
from nanovllm.cli import main  # noqa: E402
from nanovllm.ray_batch import LLMPredictor  # noqa: E402
from nanovllm.testing import process_alive  # noqa: E402

OPTIONS = dict(kvcache_block_size=8, max_model_len=64, max_num_seqs=8, max_num_batched_tokens=64)
FLAGS = ["--kvcache-block-size", "8", "--max-model-len", "64", "--max-num-seqs", "8", "--max-num-batched-tokens", "64"]
DEFAULTS = dict(temperature=0.0, max_tokens=6)  # the job's sampling params; rows override some
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello, world!"}]


@pytest.fixture(scope="module")
def cluster():
    ray.init(num_cpus=4, include_dashboard=False)  # logical CPUs: two workers, and reads and writes beside them
    # every worker is ready before the first batch goes out, so that each gets some however slowly it starts
    ray.data.DataContext.get_current().wait_for_min_actors_s = 120
    yield
    ray.shutdown()


def good_rows() -> list[dict]:
    """Token-id, text and chat prompts; some rows with their own sampling params (one seeded, not greedy)."""
    rng = random.Random(0)
    rows = [{"id": i, "prompt_token_ids": [rng.randrange(512) for _ in range(rng.randint(1, 30))]} for i in range(8)]
    rows[2]["sampling_params"] = {"max_tokens": 11}
    rows[5]["sampling_params"] = {"temperature": 0.8, "seed": 7, "max_tokens": 9}
    rows += [{"id": 8, "prompt": "The quick brown fox"},
             {"id": 9, "prompt": "Hello", "sampling_params": {"max_tokens": 2}}, {"id": 10, "messages": CHAT}]
    return rows


def expected_outputs(path: str, rows: list[dict]) -> dict[int, dict]:
    """What one in-process LLM gives for each row, by id."""
    llm = LLM(path, **OPTIONS)
    expected = {}
    for row in rows:
        params = SamplingParams(**DEFAULTS | row.get("sampling_params", {}))
        if "messages" in row:
            output, = llm.chat(row["messages"], params, use_tqdm=False)
            num_prompt_tokens = len(llm.tokenizer.encode(llm.chat_prompt(row["messages"])))
        else:
            prompt = row.get("prompt", row.get("prompt_token_ids"))
            output, = llm.generate([prompt], params, use_tqdm=False)
            num_prompt_tokens = len(llm.tokenizer.encode(prompt) if isinstance(prompt, str) else prompt)
        expected[row["id"]] = dict(text=output["text"], token_ids=output["token_ids"],
                                   finish_reason=output["finish_reason"], num_prompt_tokens=num_prompt_tokens,
                                   num_output_tokens=len(output["token_ids"]), error=None)
    llm.exit()
    return expected


def assert_each_row_once(rows: list[dict], expected: dict[int, dict]):
    assert sorted(row["id"] for row in rows) == sorted(expected)
    for row in rows:
        assert {key: row[key] for key in expected[row["id"]]} == expected[row["id"]], row["id"]


def test_cli_on_two_workers_matches_one_llm_and_reports_bad_rows(cluster, tiny_checkpoint, tmp_path, monkeypatch,
                                                                 capsys):
    path = tiny_checkpoint("qwen3")
    bad = [{"id": 20, "prompt": ""}, {"id": 21, "prompt_token_ids": list(range(65))},
           {"id": 22, "prompt": "Hi", "sampling_params": {"max_tokens": 0}}]
    rows = good_rows() + bad
    monkeypatch.chdir(tmp_path)  # relative paths, as a user types them
    with open("prompts.jsonl", "w") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)
    assert main(["batch", "prompts.jsonl", "outputs", "--model", path, "--num-workers", "2", "--batch-size", "3",
                 "--temperature", "0", "--max-tokens", "6", *FLAGS]) == 0
    assert "14 rows (3 with an error) written to outputs: " in capsys.readouterr().out
    written = pq.read_table("outputs").to_pylist()
    errors = {row["id"]: row["error"] for row in written if row["error"] is not None}
    assert errors == {20: "ValueError: prompt is empty; give at least one token",
                      21: "ValueError: prompt has 65 tokens, more than max_model_len=64; shorten it or raise "
                          "max_model_len",
                      22: "ValueError: max_tokens=0 is below 1; ask for at least one token"}
    assert all(row["text"] is None and row["token_ids"] is None for row in written if row["id"] in errors)
    assert_each_row_once([row for row in written if row["id"] not in errors], expected_outputs(path, good_rows()))
    assert main(["batch", "prompts.jsonl", "outputs", "--model", path]) == 1  # no second job's rows beside these
    assert "'outputs' already holds files; give a new output folder" in capsys.readouterr().err


class KillOnce(LLMPredictor):
    """The second batch any worker is given kills that worker's process (SIGKILL) once its rows are generated,
    before Ray has them; the marker file holds the pid, and keeps the restarted worker alive. Rows name their
    worker's pid."""

    def __init__(self, model: str, kill_marker: str, **options):
        super().__init__(model, **options)
        self.kill_marker, self.calls = kill_marker, 0

    def __call__(self, batch):
        output = super().__call__(batch)
        self.calls += 1
        if self.calls == 2 and self._first_to_die():
            os.kill(os.getpid(), signal.SIGKILL)
        return output.append_column("worker_pid", pa.array([os.getpid()] * output.num_rows))

    def _first_to_die(self) -> bool:
        """Whether this worker creates the marker (atomically: one worker of all), with its pid in it."""
        try:
            marker = os.open(self.kill_marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return False
        os.write(marker, str(os.getpid()).encode())
        os.close(marker)
        return True


def test_killed_worker_loses_and_repeats_no_row(cluster, tiny_checkpoint, tmp_path):
    path, marker = tiny_checkpoint("qwen3"), str(tmp_path / "killed")
    ds = KillOnce.map_dataset(ray.data.from_items(good_rows()), path, num_workers=2, batch_size=2,
                              sampling_params=DEFAULTS, kill_marker=marker, **OPTIONS)
    ds.write_parquet(str(tmp_path / "outputs"))
    with open(marker) as f:
        killed = int(f.read())
    assert not process_alive(killed)
    written = pq.read_table(tmp_path / "outputs").to_pylist()
    assert_each_row_once(written, expected_outputs(path, good_rows()))
    assert len({row["worker_pid"] for row in written} - {killed}) >= 2  # the other worker's and the restarted one's


class WithRankPids(LLMPredictor):
    """Each output row also names the pids of its engine's tensor-parallel ranks."""

    def __call__(self, batch):
        pids = [process.pid for process in self.llm.model_runner.processes]
        output = super().__call__(batch)
        return output.append_column("rank_pids", pa.array([pids] * output.num_rows))


def test_tensor_parallel_worker_matches_one_llm_and_its_ranks_leave_with_it(cluster, tiny_checkpoint):
    path, rows = tiny_checkpoint("qwen3"), good_rows()[:6]
    ds = WithRankPids.map_dataset(ray.data.from_items(rows), path, num_workers=1, batch_size=3,
                                  sampling_params=DEFAULTS, tensor_parallel_size=2, **OPTIONS)
    written = ds.take_all()
    assert_each_row_once(written, expected_outputs(path, rows))
    pids = {pid for row in written for pid in row["rank_pids"]}
    assert len(pids) == 2
    deadline = time.monotonic() + 30  # Ray Data ends its actors once the dataset is done
    while any(map(process_alive, pids)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(map(process_alive, pids))


def test_bad_rows_get_their_own_error(tiny_checkpoint):
    """Called in this process, as a Ray actor calls it: each bad row is named, the good ones generate."""
    path = tiny_checkpoint("qwen3")
    predictor = LLMPredictor(path, sampling_params=DEFAULTS, chat_template_kwargs={"enable_thinking": False},
                             **OPTIONS)
    rows = [{"prompt": "Hello"}, {"prompt_token_ids": []}, {"prompt_token_ids": [1, 512]},
            {"prompt": "Hi", "sampling_params": {"temperatur": 0.5}}, {"prompt": "Hi", "sampling_params": {"n": 2}},
            {"prompt": "Hi", "sampling_params": {"stop_token_ids": [600]}}, {},
            {"prompt": "Hi", "prompt_token_ids": [1]}, {"messages": CHAT},
            {"prompt": "Hello", "sampling_params": {"logprobs": 2}}]
    columns = ("prompt", "prompt_token_ids", "messages", "sampling_params")  # nulls where a row has none, as Ray's
    written = predictor(pa.table({name: [row.get(name) for row in rows] for name in columns})).to_pylist()
    errors = [row["error"] for row in written]
    assert errors[3].startswith("TypeError: ") and errors[3].endswith("unexpected keyword argument 'temperatur'")
    assert errors[:3] + errors[4:] == [
        None, "ValueError: prompt is empty; give at least one token",
        "ValueError: token id 512 is outside the vocabulary [0, 512); check the prompt's token ids against this "
        "model's tokenizer",
        "ValueError: n=2: a row is one sample; give one row per sample (with its own seed)",
        "ValueError: token id 600 is outside the vocabulary [0, 512); check stop_token_ids against this model's "
        "tokenizer",
        "ValueError: a row needs one prompt, as one of prompt, prompt_token_ids, messages; it has none",
        "ValueError: a row needs one prompt, as one of prompt, prompt_token_ids, messages; it has prompt, "
        "prompt_token_ids", None, None]
    llm = predictor.llm
    params = SamplingParams(**DEFAULTS)
    assert written[0]["token_ids"] == llm.generate("Hello", params, use_tqdm=False)[0]["token_ids"]
    assert written[0]["logprobs"] is None
    with_logprobs = llm.generate("Hello", SamplingParams(**DEFAULTS, logprobs=2), use_tqdm=False)[0]
    assert len(written[-1]["logprobs"]) == len(with_logprobs["logprobs"]) == DEFAULTS["max_tokens"]
    for step, expected in zip(written[-1]["logprobs"], with_logprobs["logprobs"]):  # Arrow's map: (key, value) pairs
        assert dict(step) == pytest.approx(expected, abs=1e-5)
    thinking_off = llm.chat(CHAT, params, use_tqdm=False, chat_template_kwargs={"enable_thinking": False})[0]
    assert written[-2]["token_ids"] == thinking_off["token_ids"]
    thinking_off_prompt = llm.chat_prompt(CHAT, {"enable_thinking": False})
    assert written[-2]["num_prompt_tokens"] == len(llm.tokenizer.encode(thinking_off_prompt))
    with pytest.raises(ValueError, match=r"input column\(s\) \['text'\] would be overwritten by the output's"):
        predictor(pa.Table.from_pylist([{"prompt": "Hi", "text": "mine"}]))
    llm.exit()


def test_missing_ray_names_the_extra(tiny_checkpoint, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)  # as if Ray were not installed
    monkeypatch.delitem(sys.modules, "nanovllm.ray_batch")
    assert main(["batch", "prompts.jsonl", "outputs", "--model", tiny_checkpoint("qwen3")]) == 1
    assert "install it with: pip install 'nanovllm-core[ray]'" in capsys.readouterr().err
