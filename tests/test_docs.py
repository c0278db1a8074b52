"""The figures in README.md and docs/sweep.md are what docs/figures.py renders from the results of a real run."""

import importlib.util
import json
import re
import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def figures():
    spec = importlib.util.spec_from_file_location("figures", REPO / "docs" / "figures.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_documents_show_what_the_recorded_runs_render_to(figures):
    assert figures.rewrite(check=True) == []
    readme = (REPO / "README.md").read_text()
    for name in ("demo", "minimal", "sweep"):
        body = re.search(rf"<!-- figures:{name} -->\n(.*?)<!-- /figures:{name} -->", readme, re.S)[1]
        assert body.strip(), name
    demo = figures.blocks()["demo"]
    assert "| MACs per sample | 599,680 |" in demo  # the digits CNN, dense, per sample


def test_an_edited_figure_is_reported_as_stale(figures, tmp_path, monkeypatch):
    copies = []
    for document in figures.DOCUMENTS:
        copy = tmp_path / document.relative_to(REPO)
        copy.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(document, copy)
        copies.append(copy)
    monkeypatch.setattr(figures, "ROOT", tmp_path)
    monkeypatch.setattr(figures, "DOCUMENTS", tuple(copies))
    readme = copies[0]
    readme.write_text(readme.read_text().replace("| params | 24,058 |", "| params | 24,000 |", 1))
    assert figures.rewrite(check=True) == ["README.md:demo"]
    figures.rewrite(check=False)
    assert figures.rewrite(check=True) == []


def test_the_demo_figures_say_how_much_they_vary_across_cpus(figures):
    """A fresh clone on an AVX2 machine printed 0.9889 -> 0.9852 where the README said 0.9926 -> 0.9852: the
    accuracies depend on the CPU's vector kernels. The block shows the recorded AVX2 run beside this machine's."""
    other = json.loads((REPO / "docs" / "results" / "demo_avx2.json").read_text())
    assert other["environment"] == figures.AVX2
    demo = figures.blocks()["demo"]
    assert f"{other['dense_test_acc']:.4f} dense -> {other['test_acc']:.4f} pruned" in demo
    assert f"this machine used {other['default_kernels']}" in demo and "repeat exactly" in demo
