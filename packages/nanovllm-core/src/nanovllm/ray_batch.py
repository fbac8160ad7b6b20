"""Data-parallel batch inference on a Ray cluster through Ray Data: one LLM per actor of a pool, each on its own GPU
(or group of ``tensor_parallel_size`` GPUs), rows streamed through in batches and written as they are done.

    import ray
    from nanovllm.ray_batch import LLMPredictor
    ds = ray.data.read_json("prompts.jsonl")
    LLMPredictor.map_dataset(ds, "Qwen/Qwen3-0.6B", num_workers=2, max_model_len=4096).write_parquet("outputs")

A row holds one prompt: ``prompt`` (text), ``prompt_token_ids`` or ``messages`` (a conversation for the chat
template); it may hold ``sampling_params``, SamplingParams' keywords over the job's defaults. Its columns come back
with the output's (``OUTPUT_SCHEMA``). A row that the engine refuses (an empty or overlong prompt, bad sampling
params) gets an ``error`` and the others generate. Ray Data restarts an actor whose process dies and retries its
batch (its defaults for actor pools: max_restarts=-1, max_task_retries=-1), so every row is written once.
"""
import os
import time

try:
    import pyarrow as pa
    import pyarrow.compute
    import pyarrow.fs
    import pyarrow.parquet as pq
    import ray
except ImportError as exc:
    raise ImportError(f"Ray batch inference needs Ray Data ({exc}); install it with: "
                      f"pip install 'nanovllm-core[ray]'") from exc

from nanovllm.llm import LLM
from nanovllm.sampling_params import SamplingParams

PROMPT_COLUMNS = ("prompt", "prompt_token_ids", "messages")
OUTPUT_SCHEMA = pa.schema([
    ("text", pa.string()),
    ("token_ids", pa.list_(pa.int64())),
    ("finish_reason", pa.string()),
    ("num_prompt_tokens", pa.int64()),
    ("num_output_tokens", pa.int64()),
    ("num_cached_tokens", pa.int64()),
    ("logprobs", pa.list_(pa.map_(pa.int64(), pa.float64()))),  # per output token, when sampling_params ask
    ("error", pa.string()),  # why the row was refused; null when it generated
])


def _without_nulls(value: dict) -> dict:
    """Arrow gives a struct's row every key of the column, null where the row had none: drop those."""
    return {key: item for key, item in value.items() if item is not None}


class LLMPredictor:
    """A Ray Data callable class: each actor builds one ``LLM(model, **engine_options)``, and each call generates
    for a batch of rows (a pyarrow Table) in one generate() call. ``sampling_params`` are the defaults of every row,
    ``chat_template_kwargs`` go to the chat template (e.g. {"enable_thinking": False} for Qwen3). The engine is
    freed with the callable when Ray Data ends the actor; a killed actor's ranks leave with it (engine/workers.py)."""

    def __init__(self, model: str, sampling_params: dict | None = None, chat_template_kwargs: dict | None = None,
                 **engine_options):
        self.llm = LLM(model, **engine_options)
        self.sampling_params = sampling_params or {}
        self.chat_template_kwargs = chat_template_kwargs
        SamplingParams(**self.sampling_params)  # bad defaults fail the job at once, not every row

    @classmethod
    def map_dataset(cls, ds: "ray.data.Dataset", model: str, *, num_workers: int | None = None,
                    batch_size: int = 256, sampling_params: dict | None = None,
                    chat_template_kwargs: dict | None = None, **engine_options) -> "ray.data.Dataset":
        """``ds`` with every row's output, lazily, as Ray Data goes: ``num_workers`` actors (default: one per
        ``tensor_parallel_size`` GPUs of the cluster, 1 without GPUs), each given ``batch_size`` rows at a time."""
        tensor_parallel_size = engine_options.get("tensor_parallel_size", 1)
        if not ray.is_initialized():  # the cluster in RAY_ADDRESS, or a local one
            ray.init()
        gpus = int(ray.cluster_resources().get("GPU", 0))
        if num_workers is None:
            num_workers = max(1, gpus // tensor_parallel_size)
        # one batch in flight per actor: a long batch queued behind another would leave a free actor idle
        compute = ray.data.ActorPoolStrategy(size=num_workers, max_tasks_in_flight_per_actor=1)
        return ds.map_batches(cls, batch_size=batch_size, batch_format="pyarrow", compute=compute,
                              num_gpus=tensor_parallel_size if gpus else 0,
                              fn_constructor_kwargs=dict(model=model, sampling_params=sampling_params,
                                                         chat_template_kwargs=chat_template_kwargs, **engine_options))

    def __call__(self, batch: pa.Table) -> pa.Table:
        clash = sorted(set(batch.column_names) & set(OUTPUT_SCHEMA.names))
        if clash:
            raise ValueError(f"input column(s) {clash} would be overwritten by the output's; rename them")
        inputs = [name for name in (*PROMPT_COLUMNS, "sampling_params") if name in batch.column_names]
        requests = [self._request(row) for row in batch.select(inputs).to_pylist()]
        valid = [request for request in requests if not isinstance(request, str)]
        outputs = iter(self.llm.generate([ids for ids, _ in valid], [params for _, params in valid], use_tqdm=False))
        rows = [{"error": request} if isinstance(request, str) else self._output_row(request[0], next(outputs))
                for request in requests]
        for field in OUTPUT_SCHEMA:
            batch = batch.append_column(field, pa.array([row.get(field.name) for row in rows], field.type))
        return batch

    def _request(self, row: dict) -> tuple[list[int], SamplingParams] | str:
        """A row's checked token ids and sampling params, or what is wrong with it."""
        try:
            given = [name for name in PROMPT_COLUMNS if row.get(name) is not None]
            if len(given) != 1:
                raise ValueError(f"a row needs one prompt, as one of {', '.join(PROMPT_COLUMNS)}; it has "
                                 f"{', '.join(given) or 'none'}")
            prompt = row[given[0]]
            if given[0] == "messages":
                prompt = self.llm.chat_prompt([_without_nulls(m) for m in prompt], self.chat_template_kwargs)
            params = SamplingParams(**self.sampling_params | _without_nulls(row.get("sampling_params") or {}))
            if params.n != 1:
                raise ValueError(f"n={params.n}: a row is one sample; give one row per sample (with its own seed)")
            return self.llm.validate_request(prompt, params), params
        except Exception as exc:  # whatever is wrong with one row fails that row alone
            return f"{type(exc).__name__}: {exc}"

    @staticmethod
    def _output_row(prompt_token_ids: list[int], output: dict) -> dict:
        return dict(text=output["text"], token_ids=output["token_ids"], finish_reason=output["finish_reason"],
                    num_prompt_tokens=len(prompt_token_ids), num_output_tokens=len(output["token_ids"]),
                    num_cached_tokens=output["num_cached_tokens"], logprobs=output.get("logprobs"))


def read_prompts(path: str) -> "ray.data.Dataset":
    """A JSONL (.jsonl, .json) or Parquet (.parquet) file, or a folder of Parquet files such as a job's output.
    Parquet is read a row group at a time; a JSONL file whole, by one task (Arrow's JSON reader)."""
    if path.endswith((".jsonl", ".json", ".jsonl.gz", ".json.gz")):
        return ray.data.read_json(path)
    return ray.data.read_parquet(path)


def _absolute(path: str) -> str:
    """A local path made absolute (a worker's working directory may not be the driver's); a URI as it is."""
    return path if "://" in path else os.path.abspath(path)


def _refuse_existing(path: str):
    """Rows already in ``path`` would be read as this job's: refuse it unless it is an empty folder."""
    filesystem, root = pyarrow.fs.FileSystem.from_uri(_absolute(path))
    info = filesystem.get_file_info(root)
    if info.type == pyarrow.fs.FileType.File or (
            info.type == pyarrow.fs.FileType.Directory and filesystem.get_file_info(pyarrow.fs.FileSelector(root))):
        raise FileExistsError(f"{path!r} already holds files; give a new output folder")


def run_job(input_path: str, output_path: str, model: str, **options) -> dict:
    """Generate for every row of ``input_path`` into Parquet files under ``output_path`` (LLMPredictor.map_dataset's
    ``options``); returns the job's counts and seconds. Every path must be reachable from every worker."""
    _refuse_existing(output_path)
    input_path, output_path = _absolute(input_path), _absolute(output_path)
    model = _absolute(model) if os.path.isdir(model) else model  # else a hub id
    start = time.perf_counter()
    LLMPredictor.map_dataset(read_prompts(input_path), model, **options).write_parquet(output_path)
    seconds = time.perf_counter() - start
    table = pq.read_table(output_path, columns=["num_prompt_tokens", "num_output_tokens", "error"])
    output_tokens = pa.compute.sum(table["num_output_tokens"]).as_py() or 0
    return dict(rows=table.num_rows, errors=table.num_rows - table["error"].null_count,
                prompt_tokens=pa.compute.sum(table["num_prompt_tokens"]).as_py() or 0, output_tokens=output_tokens,
                seconds=seconds, throughput=output_tokens / seconds)
