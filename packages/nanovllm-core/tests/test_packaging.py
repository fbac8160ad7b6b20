"""Every package carries the licence and the metadata an index shows: MIT, authors, classifiers, a summary."""
import glob
import importlib.metadata
import os
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
