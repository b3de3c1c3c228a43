"""The house rules, read from our modules' imports (every import, also those inside functions).

Rooms: model/ (networks: torch + dynamic-network-architectures), data/, evaluation/, nnunet/ (the
nnU-Net wiring), then predict.py, pipeline.py, cli.py on top. Imports flow one way.
"""
import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "entrust_nnunet"
#: modules kept at their old dotted paths for files written before the rooms (plans name the network)
OLD_PATHS = {"entrust_nnunet.network"}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, name: str | None = None) -> set[str]:
    """Every module ``path`` (module ``name``, default: from its place in the package) imports (absolute names;
    ``from x import y`` gives x and x.y; relative imports resolved against the module's package)."""
    found = set()
    package = (name or _module_name(path)).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = ".".join([*package[:len(package) - node.level + 1], *([node.module] if node.module else [])]) \
                if node.level else node.module
            found.add(base)
            found.update(f"{base}.{a.name}" for a in node.names)
    return found


MODULES = {_module_name(p): _imports(p) for p in PACKAGE.rglob("*.py")}


def _ours(imports: set[str]) -> set[str]:
    """The modules of ours among ``imports`` (a name that is a function or class maps to its module)."""
    return {name for name in imports if name in MODULES}


def _room(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _broken(module: str, imports: set[str]) -> list[str]:
    room, ours = _room(module), _ours(imports)
    problems = []
    if any(_room(m) == "cli" for m in ours) or any(i.split(".")[0] == "benchmarks" for i in imports):
        problems.append("imports cli or benchmarks")
    if room == "model":
        problems += [f"model imports {m}" for m in ours if _room(m) != "model"]
        problems += [f"model imports {i}" for i in imports if i.split(".")[0] == "nnunetv2"]  # torch + DNA only
    if room in ("data", "evaluation"):
        problems += [f"{room} imports {m}" for m in ours if _room(m) in ("model", "nnunet", "predict", "pipeline")]
    if room == "data":
        problems += [f"data imports {m}" for m in ours if _room(m) == "evaluation"]
    if room == "nnunet":  # of the evaluation room only the pure metric functions
        problems += [f"nnunet imports {m}" for m in ours if _room(m) in ("predict", "pipeline")
                     or (_room(m) == "evaluation" and m not in ("entrust_nnunet.evaluation",
                                                                "entrust_nnunet.evaluation.metrics",
                                                                "entrust_nnunet.evaluation.temperature"))]
    if room == "predict":
        problems += [f"predict imports {m}" for m in ours if _room(m) == "pipeline"]
    return problems


@pytest.mark.parametrize("module", sorted(m for m in MODULES if m not in OLD_PATHS))
def test_room_rules(module):
    assert _broken(module, MODULES[module]) == []


def test_rules_catch_a_broken_house():
    """The checker itself: imports that break each rule are reported."""
    assert _broken("entrust_nnunet.model.network", {"entrust_nnunet.evaluation.metrics"})
    assert _broken("entrust_nnunet.model.network", {"nnunetv2.training.nnUNetTrainer.nnUNetTrainer"})
    assert _broken("entrust_nnunet.model.network", {"nnunetv2.utilities.helpers"})
    assert _broken("entrust_nnunet.evaluation.metrics", {"entrust_nnunet.model.trustmap"})
    assert _broken("entrust_nnunet.data.io", {"entrust_nnunet.evaluation.summary"})
    assert _broken("entrust_nnunet.nnunet.trainers", {"entrust_nnunet.predict"})
    assert _broken("entrust_nnunet.nnunet.calibration", {"entrust_nnunet.evaluation.evaluate"})
    assert not _broken("entrust_nnunet.nnunet.calibration", {"entrust_nnunet.evaluation.metrics"})
    assert _broken("entrust_nnunet.pipeline", {"entrust_nnunet.cli"})
    assert not _broken("entrust_nnunet.nnunet.trainers", {"entrust_nnunet.model.network", "torch"})


def _cycle() -> list[str] | None:
    graph = {m: _ours(i) - {m} for m, i in MODULES.items()}
    state: dict[str, int] = {}

    def visit(m, path):
        state[m] = 1
        for n in graph[m]:
            if state.get(n) == 1:
                return path[path.index(n):] + [n] if n in path else [m, n]
            if n not in state and (c := visit(n, path + [n])):
                return c
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (c := visit(m, [m])):
            return c
    return None


def test_no_import_cycle_between_our_modules():
    # a package's __init__ is imported with each of its modules: packages themselves are not edges
    assert _cycle() is None, " -> ".join(_cycle())


def test_plugin_folders_are_thin():
    """trainers/ and plans/ only re-export classes that live in the package (nnU-Net drops them again)."""
    for folder in ("trainers", "plans"):
        for path in (PACKAGE.parent / folder).glob("*.py"):
            tree = ast.parse(path.read_text(encoding="utf-8"))
            defined = [n.name for n in tree.body if isinstance(n, (ast.ClassDef, ast.FunctionDef))]
            assert defined == [], f"{path} defines {defined}"


def test_relative_imports_are_read_as_absolute(tmp_path):
    """``from ..nnunet import x`` inside model/ is entrust_nnunet.nnunet (a broken house), not invisible."""
    module = tmp_path / "_relative_probe.py"  # not inside the package: the other test worker collects it
    module.write_text("from ..nnunet import trainers\nfrom . import network\n")
    imports = _imports(module, "entrust_nnunet.model._relative_probe")
    assert {"entrust_nnunet.nnunet", "entrust_nnunet.nnunet.trainers", "entrust_nnunet.model.network"} <= imports
    assert _broken("entrust_nnunet.model._relative_probe", imports)
