"""The bottom layer stays the bottom: nothing in flowopd/ imports the packages built on it."""
import ast
import subprocess
import sys

from tests.conftest import ROOT

ABOVE = ("rewards", "actors", "pipelines", "deploy")


def _imported_modules(path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


def test_flowopd_imports_nothing_above_it():
    offenders = {f"{p.relative_to(ROOT)}: {m}" for p in (ROOT / "flowopd").rglob("*.py")
                 for m in _imported_modules(p) if m.split(".")[0] in ABOVE}
    assert not offenders, sorted(offenders)


def test_the_walk_sees_imports_inside_functions(tmp_path):
    f = tmp_path / "m.py"
    f.write_text("def f():\n    from rewards.registry import load_reward_class\n")
    assert "rewards.registry" in _imported_modules(f)


def test_config_imports_without_the_model_libraries():
    code = "import sys, flowopd.config; print(sorted({'diffusers', 'transformers', 'peft', 'ray'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
