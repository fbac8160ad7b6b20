"""The ``nanovllm`` command: generate, info, bench."""
import argparse
import importlib.metadata
import json
import logging
import sys


def _add_engine_options(parser: argparse.ArgumentParser):
    group = parser.add_argument_group("engine options (keywords of LLM)")
    group.add_argument("--max-model-len", type=int)
    group.add_argument("--max-num-seqs", type=int)
    group.add_argument("--max-num-batched-tokens", type=int)
    group.add_argument("--tensor-parallel-size", type=int)
    group.add_argument("--gpu-memory-utilization", type=float)
    group.add_argument("--dtype")
    group.add_argument("--attention-backend")
    group.add_argument("--enforce-eager", action="store_true", default=None)


def _engine_options(args) -> dict:
    names = ["max_model_len", "max_num_seqs", "max_num_batched_tokens", "tensor_parallel_size",
             "gpu_memory_utilization", "dtype", "attention_backend", "enforce_eager"]
    return {name: getattr(args, name) for name in names if getattr(args, name) is not None}


def cmd_generate(args):
    from nanovllm import LLM, SamplingParams
    llm = LLM(args.model, **_engine_options(args))
    params = SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                            max_tokens=args.max_tokens, ignore_eos=args.ignore_eos, seed=args.seed)
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
    result = run_bench(args.model, num_seqs, input_len, output_len, args.seed, **_engine_options(args))
    print(f"Device: {result['device']}")
    print(f"Total: {result['output_tokens']} tok, Time: {result['seconds']:.2f} s, "
          f"Throughput: {result['throughput']:.2f} tok/s")
    if args.json:
        print(json.dumps(result))


def main(argv=None):
    parser = argparse.ArgumentParser(prog="nanovllm", description="nanovllm: offline LLM inference")
    parser.add_argument("--version", action="version",
                        version=f"nanovllm {importlib.metadata.version('nanovllm-core')}")
    commands = parser.add_subparsers(dest="command", required=True)

    generate = commands.add_parser("generate", help="generate text for prompts")
    generate.add_argument("model", help="local Hugging Face checkpoint folder")
    generate.add_argument("prompts", nargs="+")
    generate.add_argument("--temperature", type=float, default=0.0)
    generate.add_argument("--top-k", type=int, default=-1)
    generate.add_argument("--top-p", type=float, default=1.0)
    generate.add_argument("--max-tokens", type=int, default=64)
    generate.add_argument("--seed", type=int)
    generate.add_argument("--ignore-eos", action="store_true")
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
    bench.add_argument("--seed", type=int, default=0)
    bench.add_argument("--json", action="store_true", help="also print the result as JSON")
    _add_engine_options(bench)
    bench.set_defaults(func=cmd_bench)

    args = parser.parse_args(argv)
    try:
        args.func(args)
    except (ValueError, TypeError, OSError, RuntimeError) as exc:  # the library's errors on bad input
        logging.getLogger("nanovllm").debug("traceback", exc_info=True)  # NANOVLLM_LOG_LEVEL=DEBUG shows it
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
