"""Every package carries the licence and the metadata an index shows: MIT, authors, classifiers, a summary."""
import glob
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import tomllib

import pytest

ROOT = os.path.join(os.path.dirname(__file__), "..", "..", "..")
PYPROJECTS = sorted(glob.glob(os.path.join(ROOT, "packages", "*", "pyproject.toml")))


@pytest.mark.parametrize("pyproject", PYPROJECTS, ids=lambda p: p.split(os.sep)[-2])
def test_package_metadata_is_complete(pyproject):
    with open(pyproject, "rb") as f:
        project = tomllib.load(f)["project"]
    folder = os.path.dirname(pyproject)
    assert project["license"] == "MIT" and project["license-files"] == ["LICENSE"]
    with open(os.path.join(folder, "LICENSE")) as f, open(os.path.join(ROOT, "LICENSE")) as root:
        assert f.read() == root.read()
    assert project["authors"] and project["classifiers"] and project["description"]
    assert os.path.isfile(os.path.join(folder, project["readme"]))


def test_installed_metadata_carries_the_licence():
    for name in ("nanovllm-core", "nanovllm-models", "nanovllm-attn-mps", "nanovllm-snapkv", "nanovllm-moe-svd"):
        metadata = importlib.metadata.metadata(name)
        assert metadata["License-Expression"] == "MIT", name
        assert metadata["Author"] and metadata.get_all("Classifier"), name
    assert "Mixtral" in importlib.metadata.metadata("nanovllm-models")["Summary"]


WHEEL_DRIVER = """
import json, sys
import nanovllm
from nanovllm import LLM, SamplingParams
with LLM(sys.argv[1], max_model_len=64) as llm:
    out = llm.generate("Hello", SamplingParams(temperature=0, max_tokens=4, ignore_eos=True), use_tqdm=False)
print(json.dumps({"module": nanovllm.__file__, "tokens": out[0]["token_ids"]}))
"""


def test_the_wheels_alone_install_and_generate(tiny_checkpoint, tmp_path):
    """uv build every package into one folder; a fresh venv gets nanovllm from that folder alone (--no-index
    --find-links, no workspace, no sources), its third-party dependencies from this environment's site-packages
    (a .pth path: no download), and generates the tokens the workspace install generates."""
    uv = shutil.which("uv")
    assert uv, "uv is needed (pip install uv)"
    wheels, venv = tmp_path / "wheels", tmp_path / "venv"
    subprocess.run([uv, "build", "--all-packages", "--wheel", "-q", "-o", str(wheels)], cwd=ROOT, check=True,
                   timeout=300)
    subprocess.run([uv, "venv", "-q", "--python", sys.executable, str(venv)], check=True, timeout=120)
    python = str(venv / "bin" / "python")
    site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    third_party = next(p for p in sys.path if p.endswith("site-packages") and os.path.isdir(os.path.join(p, "torch")))
    with open(os.path.join(site, "third_party.pth"), "w") as f:
        f.write(third_party + "\n")  # a plain path: the workspace's editable installs (.pth files there) stay off
    subprocess.run([uv, "pip", "install", "-q", "--python", python, "--no-index", "--no-deps", "--find-links",
                    str(wheels), "nanovllm-core", "nanovllm-models", "nanovllm-attn-mps"], check=True, timeout=300)
    path = tiny_checkpoint("qwen3")
    (tmp_path / "driver.py").write_text(WHEEL_DRIVER)
    result = subprocess.run([python, str(tmp_path / "driver.py"), path], capture_output=True, text=True, timeout=300,
                            cwd=tmp_path, env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert result.returncode == 0, result.stderr[-3000:]
    got = json.loads(result.stdout.strip().splitlines()[-1])
    assert got["module"].startswith(site), got  # the wheel's nanovllm, not the workspace's
    from nanovllm import LLM, SamplingParams
    with LLM(path, max_model_len=64) as llm:
        expected = llm.generate("Hello", SamplingParams(temperature=0, max_tokens=4, ignore_eos=True), use_tqdm=False)
    assert got["tokens"] == expected[0]["token_ids"]
