"""The package structure: imports point one way (launch → trainer → parallel), the model and its
config sit at the bottom of the trainer, and the cost package and the solver process are torch-free."""

from __future__ import annotations

import ast
import pickle
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LEVELS = {"launch": 2, "trainer": 1, "parallel": 0}  # a package may import its own level and below
BOTTOM_OF_TRAINER = {"trainer.config", "trainer.hf_config", "trainer.model", "trainer.rope", "trainer.loss",
                     "trainer.compiled"}


def imported_modules(path: Path) -> set[str]:
    """Absolute modules a file imports, anywhere in it (deferred imports inside functions too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def module_name(path: Path, root: Path) -> str:
    return ".".join(path.relative_to(root).with_suffix("").parts).removesuffix(".__init__")


def upward_imports(root: Path) -> list[str]:
    """`file: module` for every import of a package from a higher level than the file's own."""
    found = []
    for package, level in LEVELS.items():
        for path in sorted((root / package).rglob("*.py")):
            for name in imported_modules(path):
                top = name.split(".")[0]
                if LEVELS.get(top, -1) > level:
                    found.append(f"{path.relative_to(root)}: {name}")
    return sorted(found)


def test_imports_point_one_way():
    assert upward_imports(ROOT) == []


def test_the_contract_catches_an_upward_import(tmp_path):
    for package in LEVELS:
        (tmp_path / package).mkdir()
    (tmp_path / "parallel" / "mesh.py").write_text("def f():\n    from trainer.config import JobConfig\n")
    (tmp_path / "trainer" / "loop.py").write_text("import launch.cli\nimport parallel.mesh\n")
    assert upward_imports(tmp_path) == ["parallel/mesh.py: trainer.config", "parallel/mesh.py: trainer.config.JobConfig",
                                        "trainer/loop.py: launch.cli"]


def test_the_model_and_its_config_import_nothing_above_them():
    """trainer.config (with hf_config), model (with rope), loss and compiled import only each other
    within the trainer."""
    modules = {module_name(p, ROOT): p for p in (ROOT / "trainer").glob("*.py")}
    for name in BOTTOM_OF_TRAINER:
        trainer_imports = {m for m in imported_modules(modules[name]) if m.startswith("trainer.")}
        outside = {m for m in trainer_imports if not any(m == b or m.startswith(b + ".") for b in BOTTOM_OF_TRAINER)}
        assert not outside, (name, outside)


def test_the_cost_package_and_the_job_resolution_import_no_torch():
    code = ("import sys; import parallel.planner.search, parallel.planner.adaptive, parallel.layout, trainer.job; "
            "print('torch' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"


def test_the_solver_process_plans_without_torch():
    """What the trainer's background process receives — a pickled planner and a step's lengths —
    unpickles and solves in an interpreter that never imports torch."""
    from parallel.planner.adaptive import AdaptivePlanner
    from parallel.planner.cost_model import CostModel
    from parallel.planner.hardware import PRESETS
    from trainer.config import ModelConfig

    planner = AdaptivePlanner(CostModel(ModelConfig().shape, PRESETS["H200"]), 4, 4, 4096, time_limit_s=0.5)
    payload = pickle.dumps((planner, [100, 5000, 9000, 300]))
    code = ("import pickle, sys; from parallel.planner.adaptive import solve_or_explain; "
            "planner, lengths = pickle.loads(sys.stdin.buffer.read()); plan = solve_or_explain(planner, lengths); "
            "print(sorted(i for g in plan.groups for mb in g.microbatches for i in mb), 'torch' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, input=payload, capture_output=True, timeout=120)
    assert done.returncode == 0, done.stderr.decode()
    assert done.stdout.decode().split() == ["[0,", "1,", "2,", "3]", "False"]


@pytest.mark.parametrize("package", sorted(LEVELS))
def test_every_module_says_what_it_owns(package):
    """A short docstring per module (the README's design notes name the packages, these the files)."""
    for path in (ROOT / package).rglob("*.py"):
        tree = ast.parse(path.read_text())
        if path.name == "__init__.py" and not tree.body:
            continue
        assert ast.get_docstring(tree), f"{path.relative_to(ROOT)} has no module docstring"
