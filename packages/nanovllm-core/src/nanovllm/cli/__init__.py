"""The ``nanovllm`` command: generate, info, bench, batch."""
import argparse
import importlib.metadata
import json
import logging
import os
import sys


def _value(text: str):
    """A plugin option's value from the command line: an int, a float, or the text."""
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def _add_engine_options(parser: argparse.ArgumentParser):
    """A flag for every keyword of LLM(), core's and the installed plugins', with its help (default: LLM's)."""
    import typing

    from nanovllm import plugins
    from nanovllm.config import engine_options
    group = parser.add_argument_group("engine options (keywords of LLM)")
    for option in engine_options():
        flag, help = "--" + option.name.replace("_", "-"), option.metadata["help"]
        kind = next(t for t in typing.get_args(option.type) or (option.type,) if t is not type(None))
        if kind is bool:
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=None,
                               help=f"{help} (default: {option.default})")
        else:
            group.add_argument(flag, type=kind, help=help)
    group = parser.add_argument_group("plugin options (keywords of LLM)")
    for option in plugins.plugin_options().values():
        flag = "--" + option.name.replace("_", "-")
        help = option.help if option.default is None else f"{option.help} (default: {option.default})"
        if isinstance(option.default, bool):
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help)
        else:
            group.add_argument(flag, type=_value, help=help)


def _engine_options(args) -> dict:
    from nanovllm import plugins
    from nanovllm.config import engine_options
    names = [option.name for option in engine_options()] + list(plugins.plugin_options())
    return {name: getattr(args, name) for name in names if getattr(args, name) is not None}


def _add_sampling_options(parser: argparse.ArgumentParser):
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--top-k", type=int, default=-1)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--ignore-eos", action="store_true")


def _sampling_options(args) -> dict:
    return dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, max_tokens=args.max_tokens,
                ignore_eos=args.ignore_eos)


def cmd_generate(args):
    from nanovllm import LLM, SamplingParams
    llm = LLM(args.model, **_engine_options(args))
    params = SamplingParams(**_sampling_options(args))
    if args.chat:
        outputs = llm.chat([[{"role": "user", "content": p}] for p in args.prompts], params, use_tqdm=False)
    else:
        outputs = llm.generate(args.prompts, params, use_tqdm=False)
    for prompt, output in zip(args.prompts, outputs):
        print(f"Prompt: {prompt!r}\nOutput: {output['text']!r}\n")


def cmd_info(args):
    from nanovllm.cli.info import print_attention_backend_info
    print_attention_backend_info()


def _at_least_one(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is below 1")
    return value


def cmd_bench(args):
    from nanovllm.cli.bench import default_workload_shape, run_bench
    shape = default_workload_shape()
    num_seqs = args.num_seqs if args.num_seqs is not None else shape["num_seqs"]
    input_len = tuple(args.input_len or shape["input_len"])
    output_len = tuple(args.output_len or shape["output_len"])
    for flag, (low, high) in (("--input-len", input_len), ("--output-len", output_len)):
        if low > high:
            raise ValueError(f"{flag} {low} {high}: MIN is above MAX")
    result = run_bench(args.model, num_seqs, input_len, output_len, args.workload_seed, args.repeats,
                       **_engine_options(args))
    print(f"Device: {result['device']}")
    print(f"Total: {result['output_tokens']} tok, Time: {result['median_seconds']:.2f} s (median of "
          f"{result['repeats']}: {', '.join(f'{s:.2f}' for s in result['seconds'])}), Throughput: "
          f"{result['throughput']:.2f} tok/s ({result['throughput_min']:.2f} to {result['throughput_max']:.2f})")
    if args.json:
        print(json.dumps(result))


def cmd_batch(args):
    if "RAY_ADDRESS" not in os.environ:  # a local cluster's workers run this interpreter, not a uv-built copy
        os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
    from nanovllm.ray_batch import run_job
    result = run_job(args.input, args.output, args.model, num_workers=args.num_workers, batch_size=args.batch_size,
                     sampling_params=_sampling_options(args), chat_template_kwargs=args.chat_template_kwargs,
                     **_engine_options(args))
    print(f"{result['rows']} rows ({result['errors']} with an error) written to {args.output}: "
          f"{result['prompt_tokens']} prompt and {result['output_tokens']} output tokens in "
          f"{result['seconds']:.2f} s, {result['throughput']:.2f} output tok/s")


def main(argv=None):
    parser = argparse.ArgumentParser(prog="nanovllm", description="nanovllm: offline LLM inference")
    parser.add_argument("--version", action="version",
                        version=f"nanovllm {importlib.metadata.version('nanovllm-core')}")
    commands = parser.add_subparsers(dest="command", required=True)

    generate = commands.add_parser("generate", help="generate text for prompts")
    generate.add_argument("model", help="a local Hugging Face checkpoint folder or a hub id (Qwen/Qwen3-0.6B)")
    generate.add_argument("prompts", nargs="+")
    _add_sampling_options(generate)
    generate.add_argument("--chat", action="store_true", help="apply the tokenizer's chat template")
    _add_engine_options(generate)
    generate.set_defaults(func=cmd_generate)

    info = commands.add_parser("info", help="platform, plugins and the attention backend that would be chosen")
    info.set_defaults(func=cmd_info)

    bench = commands.add_parser("bench", help="throughput on upstream nano-vllm's bench workload")
    bench.add_argument("--model", help="checkpoint folder (default: random weights made locally)")
    bench.add_argument("--num-seqs", type=_at_least_one)
    bench.add_argument("--input-len", type=_at_least_one, nargs=2, metavar=("MIN", "MAX"))
    bench.add_argument("--output-len", type=_at_least_one, nargs=2, metavar=("MIN", "MAX"))
    bench.add_argument("--workload-seed", type=int, default=0, help="seed of the random prompts and lengths")
    bench.add_argument("--repeats", type=_at_least_one, default=3, help="timed runs after the warm-up")
    bench.add_argument("--json", action="store_true", help="also print the result, with the parameters, as JSON")
    _add_engine_options(bench)
    bench.set_defaults(func=cmd_bench)

    batch = commands.add_parser("batch", help="generate for a JSONL or Parquet file of prompts on a Ray cluster "
                                              "(RAY_ADDRESS, else a local one), one engine per worker")
    batch.add_argument("input", help="a .jsonl/.json or .parquet file, or a folder of Parquet files: one row per "
                                     "prompt, with prompt (text), prompt_token_ids or messages (a chat), and "
                                     "optionally sampling_params (SamplingParams' keywords over the flags below)")
    batch.add_argument("output", help="a new folder for the Parquet files of the output rows: the input's columns, "
                                      "the output's, and error for a row that could not generate")
    batch.add_argument("--model", required=True, help="a checkpoint folder or hub id that every worker can reach")
    batch.add_argument("--num-workers", type=_at_least_one,
                       help="engines, each on tensor_parallel_size GPUs (default: all the cluster's GPUs; 1 without)")
    batch.add_argument("--batch-size", type=_at_least_one, default=256,
                       help="rows per engine call: more keeps an engine's running batch full for longer, fewer "
                            "spreads a short job over the workers and loses less work to a failed one")
    _add_sampling_options(batch)
    batch.add_argument("--chat-template-kwargs", type=json.loads, metavar="JSON",
                       help='for the chat template, e.g. \'{"enable_thinking": false}\' for Qwen3')
    _add_engine_options(batch)
    batch.set_defaults(func=cmd_batch)

    args = parser.parse_args(argv)
    try:
        args.func(args)
    except (ValueError, TypeError, OSError, RuntimeError, ImportError) as exc:  # bad input, a missing extra
        logging.getLogger("nanovllm").debug("traceback", exc_info=True)  # NANOVLLM_LOG_LEVEL=DEBUG shows it
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
