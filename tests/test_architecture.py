"""The package's shape, read from its source: imports run one way, the loop asks the task, one image reader."""

import ast
import importlib
from pathlib import Path

import pytest

import vislora
import vislora.cli
from vislora import tasks

PACKAGE = Path(__file__).resolve().parent.parent / "vislora"
INTERFACE = ("NAME", "SCORE", "EXPORT", "build", "build_model", "adapt", "loss", "validate", "health", "preview",
             "predictor",
             "evaluate", "format_report", "example_inputs", "predict", "format_prediction")
# optional or heavy: may be imported late. The loggers of train.log (vislora.loggers) import their optional package
# in their constructor, after checking it is installed: tensorboard (through torch.utils.tensorboard), mlflow, wandb
LAZY_OK = {"peft", "pycocotools", "onnx", "onnxruntime", "matplotlib", "torch.utils.tensorboard", "mlflow", "wandb"}


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _imports(path: Path, name: str, modules: dict) -> list[tuple[str, bool]]:
    """(vislora module imported, at top level?) for every import statement of the file."""
    tree = ast.parse(path.read_text())
    top = {id(node) for node in tree.body}
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                head = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(head + ([base] if base else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        else:
            continue
        found += [(t, id(node) in top) for t in targets if t.split(".")[0] == "vislora"]
    return found


def test_no_import_cycle_and_no_local_vislora_import():
    modules = _modules()
    graph = {}
    for name, path in modules.items():
        deps = _imports(path, name, modules)
        local = [d for d, at_top in deps if not at_top]
        assert not local, f"{name} imports {local} inside a function: import at the top (no cycles to dodge)"
        graph[name] = {d for d, _ in deps if d in modules and d != name}
    state: dict[str, int] = {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                cycle = trail[trail.index(dep):] + [dep] if dep in trail else [node, dep]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if dep not in state:
                visit(dep, trail + [dep])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])


def test_lazy_imports_are_only_optional_dependencies():
    for name, path in _modules().items():
        tree = ast.parse(path.read_text())
        top = {id(node) for node in tree.body}
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)) and id(node) not in top:
                modules = {a.name for a in node.names} if isinstance(node, ast.Import) else {node.module or ""}
                late = {m for m in modules if not any(m == ok or m.startswith(ok + ".") for ok in LAZY_OK)}
                assert not late, f"{name}:{node.lineno} imports {late} inside a function"


# Start-up time, not a cycle: the CLI and the package's __init__ (which `python -m vislora` and the console script
# run first) import the heavy modules by name when a command or an API name is used, through importlib and a table
# (vislora.cli.COMMANDS, vislora.API), so that `--help` and refused arguments do not wait 5-20 s for torch, timm,
# onnxruntime and matplotlib. Exactly these two places; everywhere else imports stay at the top.
LATE_BY_TABLE = {"vislora": "API", "vislora.cli": "COMMANDS"}
LIGHT = {"vislora.errors", "vislora.files", "vislora.hub", "vislora.image", "vislora.recipe", "vislora.runpaths"}
HEAVY = {"torch", "timm", "torchvision", "onnxruntime", "onnx", "matplotlib", "albumentations", "sklearn", "cv2",
         "safetensors", "peft", "pycocotools"}


def _import_roots(path: Path, name: str, modules: dict) -> set[str]:
    """Top-level imports of a module: vislora modules by name, third-party ones by package."""
    found = {d for d, at_top in _imports(path, name, modules) if at_top and d in modules}
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[0] for a in node.names if not a.name.startswith("vislora")}
        elif isinstance(node, ast.ImportFrom) and not (node.module or "").startswith("vislora") and not node.level:
            found.add((node.module or "").split(".")[0])
    return found


def test_importlib_only_in_the_two_start_up_tables():
    for name, path in _modules().items():
        uses = "import_module(" in path.read_text()
        assert not uses or name in LATE_BY_TABLE, f"{name} imports by name: import at the top"
    assert set(vislora.cli.COMMANDS) == set(vislora.cli.build_parser()._subparsers._group_actions[0].choices)
    for target in vislora.cli.COMMANDS.values():
        module, _, function = target.partition(":")
        assert callable(getattr(importlib.import_module(module), function)), target
    for name in vislora.API:
        assert getattr(vislora, name) is getattr(importlib.import_module(vislora.API[name]), name)


def test_the_cli_imports_only_light_modules_before_a_command_runs():
    """vislora.cli and the modules it imports at the top (and theirs) import nothing heavy."""
    modules = _modules()
    seen, todo = set(), ["vislora.cli", "vislora"]
    while todo:
        name = todo.pop()
        seen.add(name)
        roots = _import_roots(modules[name], name, modules)
        heavy = roots & HEAVY
        assert not heavy, f"{name} imports {heavy} at the top, so `vislora --help` would wait for them"
        todo += [r for r in roots if r in modules and r not in seen]
    assert seen - {"vislora", "vislora.cli"} <= LIGHT, seen


@pytest.mark.parametrize("module", ["train.py", "evaluate.py", "export.py", "rundir.py", "exported.py"])
def test_loop_evaluation_and_export_never_name_a_task(module):
    source = (PACKAGE / module).read_text()
    tree = ast.parse(source)
    names = {t.NAME for t in tasks.TASKS.values()}
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            assert node.value not in names, f"{module} tests for the task '{node.value}': ask the task instead"
    assert "_is_detector" not in source


@pytest.mark.parametrize("name", sorted(tasks.TASKS))
def test_every_task_provides_the_interface(name):
    module = tasks.get(name)
    missing = [attr for attr in INTERFACE if not hasattr(module, attr)]
    assert not missing, f"task {name} lacks {missing}"
    assert module.NAME == name
    assert set(module.EXPORT) == {"torchscript", "input", "onnx", "served"}


def test_one_image_reader():
    """Only vislora/image.py opens image files for their pixels (Image.open(...).convert / np.asarray)."""
    for name, path in _modules().items():
        if name == "vislora.image":
            continue
        source = path.read_text()
        assert "Image.open(" not in source, f"{name} opens images itself: use vislora.image.read_image"
    roots = set()
    for node in ast.walk(ast.parse((PACKAGE / "image.py").read_text())):
        if isinstance(node, ast.Import):
            roots |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            roots.add((node.module or "").split(".")[0])
    assert roots <= {"__future__", "math", "os", "collections", "numpy", "PIL", "vislora"}, roots  # no timm ...
    vislora_imports = {d for d, _ in _imports(PACKAGE / "image.py", "vislora.image", _modules())}
    assert vislora_imports <= {"vislora.errors"}, vislora_imports  # the stdlib-only error type alone


def _task_of(module: str) -> str | None:
    """The task a module of vislora/tasks/ belongs to: `detection` for tasks/detection.py and tasks/detection_*.py;
    None for what the tasks share (backbone, common, the interface)."""
    if not module.startswith("vislora.tasks."):
        return None
    stem = module.rpartition(".")[2]
    return next((name for name in tasks.TASKS if stem == name or stem.startswith(name + "_")), None)


def test_no_task_imports_another_task():
    modules = _modules()
    for name, path in modules.items():
        own = _task_of(name)
        if own is None:
            continue
        others = {d for d, _ in _imports(path, name, modules) if _task_of(d) not in (None, own)}
        assert not others, f"{name} imports {sorted(others)}: move what tasks share to tasks/backbone.py or common.py"


def test_the_shared_task_modules_import_no_task():
    modules = _modules()
    for name in ("vislora.tasks.backbone", "vislora.tasks.common"):
        found = {d for d, _ in _imports(modules[name], name, modules) if _task_of(d)}
        assert not found, f"{name} imports the task module(s) {sorted(found)}"


NOT_YET_SPLIT = {"vislora.train", "vislora.recipe", "vislora.inject", "vislora.svd"}  # #26: after the #27 merge


def test_no_module_over_500_lines():
    long = {name: n for name, path in _modules().items()
            if (n := len(path.read_text().splitlines())) > 500 and name not in NOT_YET_SPLIT}
    assert not long, f"split these along a seam: {long}"
