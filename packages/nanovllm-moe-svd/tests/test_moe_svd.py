"""Low-rank experts: the manager against resident experts holding the reconstructed weights U V, full-rank PCA
against Hugging Face, distillation against PCA, and the three tools end to end."""
import json
import logging
import os
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from nanovllm import LLM, SamplingParams
from nanovllm.testing import make_prompts
from nanovllm_moe_svd import SVDExperts
from nanovllm_moe_svd.collect_calib import main as collect_calib
from nanovllm_moe_svd.decompose import main as decompose
from nanovllm_moe_svd.distill import distill_projection, main as distill
from nanovllm_moe_svd.factors import PROJECTIONS, moe_layers, v_path
from nanovllm_moe_svd.linalg import pca_factors

OPTIONS = dict(kvcache_block_size=8, max_model_len=128, max_num_seqs=8, max_num_batched_tokens=64)
GREEDY = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
MOE_MODELS = ["mixtral", "qwen2_moe", "qwen3_moe"]


def factors(tmp_path, path, rank, *extra):
    folder = str(tmp_path / f"svd-{rank}")
    decompose(["--model-path", path, "--rank", str(rank), "--device", "cpu", "--dtype", "float32",
               "--output-dir", folder, *extra])
    return folder


def reconstructed_checkpoint(path, folder, dest) -> str:
    """A copy of the checkpoint whose expert weights are U @ V: what the low-rank experts compute."""
    shutil.copytree(path, dest, ignore=shutil.ignore_patterns("svd_experts"))
    tensors = load_file(os.path.join(dest, "model.safetensors"))
    with safe_open(os.path.join(folder, "U_matrices.safetensors"), "pt", "cpu") as bases:
        for layer in moe_layers(path):
            for expert in range(layer.num_experts):
                v = load_file(v_path(folder, layer.index, expert))
                for p in PROJECTIONS:
                    tensors[layer.tensor_name(expert, p)] = bases.get_tensor(f"layer_{layer.index}.{p}") @ v[p]
    save_file(tensors, os.path.join(dest, "model.safetensors"), metadata={"format": "pt"})
    return str(dest)


def tokens(path, **options):
    llm = LLM(path, **{**OPTIONS, **options})
    try:
        return [o["token_ids"] for o in llm.generate(make_prompts(), GREEDY, use_tqdm=False)], llm
    finally:
        llm.exit()


@pytest.mark.parametrize("model", MOE_MODELS)
def test_manager_output_equals_resident_with_the_reconstructed_weights(model, tiny_checkpoint, tmp_path):
    """Layer by layer on random inputs (the CPU path, and the grouped path by Triton's interpreter), then whole
    generations, with tensor parallelism over gloo for Mixtral."""
    from nanovllm.default_plugins.expert_managers import ResidentExperts
    path = tiny_checkpoint(model)
    folder = factors(tmp_path, path, 12)
    dense = reconstructed_checkpoint(path, folder, tmp_path / "dense")
    with safe_open(os.path.join(folder, "U_matrices.safetensors"), "pt", "cpu") as bases:
        for layer in moe_layers(path):
            config = ManagerConfig(path)
            svd = SVDExperts(layer.num_experts, layer.hidden_size, layer.intermediate_size, layer.checkpoint_names,
                             config)
            svd.load_factors(folder, layer, 12, bases)
            resident = ResidentExperts(layer.num_experts, layer.hidden_size, layer.intermediate_size,
                                       layer.checkpoint_names, config)
            reader = safe_open(os.path.join(dense, "model.safetensors"), "pt", "cpu")
            for expert in range(layer.num_experts):
                for p in PROJECTIONS:
                    name = layer.tensor_name(expert, p)
                    resident.load_checkpoint_tensor(name.split(".experts.")[1], reader.get_tensor(name))
            generator = torch.Generator().manual_seed(layer.index)
            x = torch.randn(9, layer.hidden_size, generator=generator)
            ids = torch.randint(layer.num_experts, (9, 2), generator=generator)
            weights = torch.rand(9, 2, generator=generator)
            assert torch.allclose(svd(x, weights, ids), resident(x, weights, ids), atol=1e-4, rtol=1e-4)
    expected, _ = tokens(dense, expert_manager="resident")
    assert tokens(path, svd_experts_dir=folder)[0] == expected
    if model == "mixtral":
        assert tokens(path, svd_experts_dir=folder, tensor_parallel_size=2)[0] == expected


class ManagerConfig:
    """The bits of a Config a manager reads, for building one outside an engine."""

    def __init__(self, path):
        self.model = path
        self.plugin_options = {"svd_experts_dir": None}


def grouped_path_matches_the_cpu_path(path, folder, rank, dtype_name="float32"):
    """Run by Triton's interpreter (CPU tensors, float32) or on a GPU (in ``dtype_name``): grouped_forward against
    the per-expert loop in float32 on the CPU, on the same factors."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = getattr(torch, dtype_name)
    with safe_open(os.path.join(folder, "U_matrices.safetensors"), "pt", "cpu") as bases:
        for layer in moe_layers(path):
            managers = {}
            for where, kind in ((device, dtype), ("cpu", torch.float32)):
                default = torch.get_default_dtype()
                torch.set_default_dtype(kind)
                try:
                    with torch.device(where):
                        managers[where, kind] = SVDExperts(layer.num_experts, layer.hidden_size,
                                                           layer.intermediate_size, layer.checkpoint_names,
                                                           ManagerConfig(path))
                        managers[where, kind].load_factors(folder, layer, rank, bases)
                finally:
                    torch.set_default_dtype(default)
            grouped, loop = managers[device, dtype], managers["cpu", torch.float32]
            for tokens in (1, 5, 40):  # decode-sized steps and a prefill-sized one
                generator = torch.Generator().manual_seed(tokens)
                x = torch.randn(tokens, layer.hidden_size, generator=generator)
                ids = torch.randint(layer.num_experts, (tokens, 2), generator=generator)
                weights = torch.rand(tokens, 2, generator=generator)
                got = grouped.grouped_forward(x.to(device, dtype), weights.to(device), ids.to(device)).float().cpu()
                expected = loop(x, weights, ids)
                error = ((got - expected).norm() / expected.norm()).item()
                assert error < (1e-5 if dtype == torch.float32 else 2e-2), (tokens, error)


@pytest.mark.parametrize("model", ["mixtral", "qwen3_moe"])
def test_the_grouped_triton_path_matches_under_the_interpreter(model, tiny_checkpoint, tmp_path):
    from nanovllm.testing import run_interpreted
    path = tiny_checkpoint(model)
    run_interpreted(__file__, "grouped_path_matches_the_cpu_path", path, factors(tmp_path, path, 12), 12)


def test_full_rank_pca_reproduces_the_experts_and_matches_hf(tiny_checkpoint, tmp_path, assert_matches_hf):
    path = tiny_checkpoint("mixtral")
    layer = moe_layers(path)[0]
    full = max(layer.intermediate_size, layer.hidden_size)
    folder = factors(tmp_path, path, full)
    dense = load_file(os.path.join(path, "model.safetensors"))
    with safe_open(os.path.join(folder, "U_matrices.safetensors"), "pt", "cpu") as bases:
        for expert in range(layer.num_experts):
            v = load_file(v_path(folder, layer.index, expert))
            for p in PROJECTIONS:
                weight = dense[layer.tensor_name(expert, p)]
                error = (bases.get_tensor(f"layer_{layer.index}.{p}") @ v[p] - weight).norm() / weight.norm()
                assert error < 1e-5, (p, error)
    generated, _ = tokens(path, svd_experts_dir=folder)
    assert_matches_hf(path, make_prompts(), [{"token_ids": t} for t in generated])


def test_distillation_beats_pca_on_activations_with_structure():
    """Inputs that live near an 8-dimensional subspace (plus a little noise): at the same rank the distilled
    factors reproduce the experts' outputs on them better than PCA of the weights, also on fresh inputs."""
    generator = torch.Generator().manual_seed(0)
    experts, out, inp, rank = 4, 48, 32, 6
    weights = torch.randn(experts, out, inp, generator=generator)

    def inputs(n):
        mixing = torch.randn(experts, 8, inp, generator=torch.Generator().manual_seed(1))
        return [torch.randn(n, 8, generator=generator) @ mixing[e] + 0.01 * torch.randn(n, inp, generator=generator)
                for e in range(experts)]

    def error(basis, factors, xs):
        return sum(((x @ (basis @ factors[e]).t()) - x @ weights[e].t()).pow(2).sum() for e, x in enumerate(xs))
    train, fresh = inputs(200), inputs(200)
    pca = pca_factors(weights, rank, oversample=0)
    distilled = distill_projection(weights, train, rank, ridge=1e-3, chunk=64, oversample=0)
    assert error(*distilled, train) < 0.8 * error(*pca, train)
    assert error(*distilled, fresh) < 0.8 * error(*pca, fresh)


def test_the_three_tools_end_to_end_then_generation(tiny_checkpoint, tmp_path, caplog, monkeypatch):
    source = tiny_checkpoint("qwen2_moe")
    path = str(tmp_path / "model")
    shutil.copytree(source, path)
    dense_tokens, _ = tokens(path)
    calib = str(tmp_path / "calib.safetensors")
    collect_calib(["--model-path", path, "--out", calib, "--cap-per-group", "64", "--num-prompts", "6",
                   "--max-new-tokens", "4"])
    with safe_open(calib, "pt", "cpu") as f:
        assert f.metadata()["fingerprint"] and 0 < len(f.keys()) <= 3 * 4  # sparse layers 1-2 (layer 0 is dense)
        assert all(f.get_tensor(k).size(0) <= 64 for k in f.keys())
    distill(["--model-path", path, "--calib-path", calib, "--rank", "48", "--device", "cpu", "--dtype", "float32",
             "--pca-oversample", "0"])
    metadata = json.load(open(os.path.join(path, "svd_experts", "metadata.json")))
    assert metadata["method"] == "distill" and metadata["rank"] == 48
    with caplog.at_level(logging.INFO, logger="nanovllm.moe_svd"):
        svd_tokens, llm = tokens(path)
    assert f"Using SVD expert manager from {os.path.join(path, 'svd_experts')}" in caplog.text
    assert all(len(t) == GREEDY.max_tokens for t in svd_tokens)
    monkeypatch.setenv("NANOVLLM_DISABLE_SVD", "1")
    assert tokens(path)[0] == dense_tokens
    monkeypatch.delenv("NANOVLLM_DISABLE_SVD")
    assert tokens(path, expert_manager="resident")[0] == dense_tokens


def test_bad_input_is_refused(tiny_checkpoint, tmp_path, capsys):
    mixtral, dense = tiny_checkpoint("mixtral"), tiny_checkpoint("qwen3")

    def refused(tool, args, message):
        with pytest.raises(SystemExit) as info:
            tool(args)
        assert message in str(info.value), info.value
    refused(decompose, ["--model-path", mixtral, "--rank", "129", "--output-dir", str(tmp_path / "a")],
            "--rank 129 is above what layer 0's experts can use")
    refused(decompose, ["--model-path", dense, "--rank", "8", "--output-dir", str(tmp_path / "b")],
            "has no mixture-of-experts layers")
    folder = factors(tmp_path, mixtral, 8)
    refused(decompose, ["--model-path", mixtral, "--rank", "8", "--output-dir", folder], "pass --overwrite")
    factors(tmp_path, mixtral, 8, "--overwrite")
    calib = str(tmp_path / "calib.safetensors")
    other = tiny_checkpoint("mixtral", seed=1)
    collect_calib(["--model-path", other, "--out", calib, "--num-prompts", "2", "--max-new-tokens", "2"])
    refused(distill, ["--model-path", mixtral, "--calib-path", calib, "--rank", "8", "--output-dir",
                      str(tmp_path / "c")], "was collected from another model")
    refused(collect_calib, ["--model-path", other, "--out", calib], "pass --overwrite")
    # factors whose shapes do not fit the model: the error names both
    metadata_path = os.path.join(folder, "metadata.json")
    metadata = json.load(open(metadata_path))
    json.dump({**metadata, "rank": 16}, open(metadata_path, "w"))
    with pytest.raises(ValueError, match=r"layer_0.gate is \[128, 8\], but rank 16 factors of this model's experts "
                                         r"\(hidden 64, intermediate 128\) are \[128, 16\]"):
        LLM(mixtral, **OPTIONS, svd_experts_dir=folder)
    with pytest.raises(ValueError, match="expert_manager='svd' cannot run here: it needs low-rank factors in"):
        LLM(mixtral, **OPTIONS, expert_manager="svd")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_on_the_gpu_grouped_kernels_and_graphs_give_the_reconstructed_models_tokens(dtype, tiny_checkpoint, tmp_path):
    """The grouped path on CUDA against the float32 loop; then generation with decode CUDA graphs against Hugging
    Face running the reconstructed dense weights (half-precision and routing near-ties allowed)."""
    from nanovllm.testing import GPU_MOE, GPU_TINY, hf_greedy_mismatches
    path = tiny_checkpoint("mixtral", **{**GPU_TINY, **GPU_MOE["mixtral"], "dtype": getattr(torch, dtype)})
    folder = factors(tmp_path, path, 32)
    grouped_path_matches_the_cpu_path(path, folder, 32, dtype)
    dense = reconstructed_checkpoint(path, folder, tmp_path / "dense")
    llm = LLM(path, svd_experts_dir=folder, max_model_len=1024, dtype=dtype, kv_cache_memory_gib=1)
    assert llm.model_runner.graphs, "decode steps were meant to run in CUDA graphs"
    prompts = [list(range(1, n)) for n in (2, 40, 300)]
    outputs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True), use_tqdm=False)
    llm.exit()
    problems = hf_greedy_mismatches(dense, prompts, [o["token_ids"] for o in outputs], tol=0.1, device="cuda",
                                    dtype=getattr(torch, dtype), noise_dtype=torch.float32, router_tol=0.04)
    assert not problems, "\n".join(problems)


def test_the_dense_experts_are_not_read(tiny_checkpoint, tmp_path, monkeypatch):
    """The loader skips the tensors of a manager whose reads_checkpoint is False: Mixtral's 90 GB stay on disk."""
    import nanovllm.loader
    path = tiny_checkpoint("mixtral")
    folder = factors(tmp_path, path, 12)
    read = []
    real_safe_open = nanovllm.loader.safe_open

    class Spy:
        def __init__(self, *args):
            self.file = real_safe_open(*args)

        def __enter__(self):
            handle = self.file.__enter__()
            get_tensor = handle.get_tensor
            self.keys, self.get_tensor = handle.keys, lambda name: read.append(name) or get_tensor(name)
            return self

        def __exit__(self, *exc):
            return self.file.__exit__(*exc)
    monkeypatch.setattr(nanovllm.loader, "safe_open", Spy)
    tokens(path, svd_experts_dir=folder)
    assert read and not [name for name in read if ".experts." in name]
    read.clear()
    tokens(path, expert_manager="resident")
    assert [name for name in read if ".experts." in name]  # the spy sees them when they are read
