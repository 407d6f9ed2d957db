"""Layers stay layers: nothing in flowopd/ imports the packages built on it (the demo's world included),
rewards/ stands on its own (not even flowopd/), and a pipeline's --help needs neither torch nor Ray."""
import ast
import subprocess
import sys

import pytest

from tests.conftest import ROOT

ABOVE = ("rewards", "actors", "pipelines", "deploy", "world")
HEAVY = ("torch", "ray", "diffusers")
PIPELINES = sorted(p.stem for p in (ROOT / "pipelines").glob("*.py")
                   if any(isinstance(n, ast.FunctionDef) and n.name == "main" for n in ast.parse(p.read_text()).body))


def _imported_modules(path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


def _offenders(package: str, forbidden: tuple[str, ...]) -> set[str]:
    return {f"{p.relative_to(ROOT)}: {m}" for p in (ROOT / package).rglob("*.py")
            for m in _imported_modules(p) if m.split(".")[0] in forbidden}


def test_flowopd_imports_nothing_above_it():
    offenders = _offenders("flowopd", ABOVE)
    assert not offenders, sorted(offenders)


def test_rewards_import_no_other_package_of_this_repository():
    offenders = _offenders("rewards", ("flowopd", "world", "actors", "pipelines", "deploy"))
    assert not offenders, sorted(offenders)


def test_the_walk_sees_imports_inside_functions(tmp_path):
    f = tmp_path / "m.py"
    f.write_text("def f():\n    from rewards.registry import load_reward_class\n")
    assert "rewards.registry" in _imported_modules(f)


def test_config_imports_without_the_model_libraries():
    code = ("import sys, flowopd.config\n"
            "print(sorted({'torch', 'diffusers', 'transformers', 'peft', 'ray'} & set(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_every_pipeline_has_a_main():
    assert {"opd", "grpo", "evaluate", "recipe", "demo", "train_world"} <= set(PIPELINES)


@pytest.mark.parametrize("name", PIPELINES)
def test_help_imports_neither_torch_nor_ray(name):
    """-X importtime lists every module the command imported, on stderr."""
    out = subprocess.run([sys.executable, "-X", "importtime", "-m", f"pipelines.{name}", "--help"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 0 and out.stdout.startswith("usage:"), out.stderr[-2000:]
    imported = {line.rsplit("|", 1)[-1].strip().split(".")[0] for line in out.stderr.splitlines()
                if line.startswith("import time:")}
    assert not set(HEAVY) & imported, (name, sorted(set(HEAVY) & imported))
