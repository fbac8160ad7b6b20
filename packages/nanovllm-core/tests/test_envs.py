"""envs/<family> are the per-GPU uv projects: each lock matches its pyproject, holds the workspace's packages from
the tree and at most one flash-attn major, and the CPU one syncs and runs on its own."""
import os
import shutil
import subprocess
import tomllib

import pytest

ROOT = os.path.join(os.path.dirname(__file__), "..", "..", "..")
SHARED = {"nanovllm-core", "nanovllm-models", "nanovllm-attn-mps", "nanovllm-snapkv", "nanovllm-moe-svd"}
FAMILIES = {"cpu": (set(), None), "ampere": ({"nanovllm-attn-fa2"}, 2), "turing": ({"nanovllm-attn-fa1"}, 1)}


def uv() -> str:
    path = shutil.which("uv")
    assert path, "uv is needed (pip install uv)"
    return path


def locked_packages(folder: str) -> list[dict]:
    with open(os.path.join(folder, "uv.lock"), "rb") as f:
        return tomllib.load(f)["package"]


def uv_env(**extra) -> dict:
    """The caller's environment without its virtualenv: each envs/ project has its own."""
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "UV_PROJECT_ENVIRONMENT", "PYTHONPATH")}
    return env | extra


@pytest.mark.parametrize("family", FAMILIES)
def test_env_lock_matches_its_pyproject(family):
    folder = os.path.join(ROOT, "envs", family)
    result = subprocess.run([uv(), "lock", "--check"], cwd=folder, capture_output=True, text=True, timeout=300,
                            env=uv_env())
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.mark.parametrize("family", FAMILIES)
def test_env_holds_the_tree_packages_and_one_flash_attn_major(family):
    backends, flash_attn_major = FAMILIES[family]
    packages = locked_packages(os.path.join(ROOT, "envs", family))
    ours = {p["name"]: p["source"] for p in packages if p["name"].startswith("nanovllm-")}
    assert ours.pop(f"nanovllm-env-{family}") == {"virtual": "."}
    assert ours == {name: {"editable": f"../../packages/{name}"} for name in SHARED | backends}
    majors = [int(p["version"].split(".")[0]) for p in packages if p["name"] == "flash-attn"]
    assert majors == ([flash_attn_major] if flash_attn_major else [])


def test_root_workspace_builds_no_flash_attn():
    assert not [p for p in locked_packages(ROOT) if p["name"] == "flash-attn"]


def test_cpu_env_syncs_and_chooses_the_mps_backend(tmp_path):
    """A real `uv sync` of envs/cpu into a temporary environment (uv's cache links the wheels), then its CLI."""
    folder = os.path.join(ROOT, "envs", "cpu")
    before = sorted(os.listdir(folder))
    env = uv_env(UV_PROJECT_ENVIRONMENT=str(tmp_path / "venv"), CUDA_VISIBLE_DEVICES="")
    subprocess.run([uv(), "sync", "--locked", "-q"], cwd=folder, env=env, check=True, timeout=600)
    info = subprocess.run([uv(), "run", "--locked", "nanovllm", "info"], cwd=folder, env=env, capture_output=True,
                          text=True, timeout=300)
    assert info.returncode == 0, info.stderr[-3000:]
    assert "attn_mps: nanovllm-attn-mps" in info.stdout and "Chosen: mps" in info.stdout, info.stdout
    assert sorted(os.listdir(folder)) == before  # the environment went to the temporary folder, not envs/cpu/.venv
