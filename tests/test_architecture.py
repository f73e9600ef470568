"""The package's shape, read from its source: imports run one way, the loop asks the task, one image reader."""

import ast
import importlib
from pathlib import Path

import pytest

import vislora
import vislora.cli
from vislora import tasks

PACKAGE = Path(__file__).resolve().parent.parent / "vislora"
# what every task writes (vislora.tasks.REQUIRED); the rest of the interface is vislora.tasks.OPTIONAL, with defaults
INTERFACE = ("NAME", "SCORE", "EXPORT", "build", "build_model", "adapt", "loss", "validate", "preview", "predictor",
             "evaluate", "format_report", "predict", "format_prediction")
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
LIGHT = {"vislora.defaults", "vislora.errors", "vislora.files", "vislora.hub", "vislora.image", "vislora.recipe",
         "vislora.runpaths"}
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


# Outside vislora/tasks/, a task's name stands as a string constant (a literal equal to "classification",
# "detection", ...) only in vislora/defaults.py and vislora/recipe.py, and there only as data: a key or a value of
# a dict display (TASK_DEFAULTS' keys, DEFAULTS' "task"). Never in a comparison, a subscript or a call anywhere:
# code outside vislora/tasks/ asks vislora.tasks.get(recipe["task"]) for a capability. Strings that merely contain
# a name (CLI help text such as "recipe YAML file (classification)", messages, docstrings) are prose, not a test,
# and are allowed.
NAMED_AS_DATA = {"vislora.defaults", "vislora.recipe"}
# (module, top-level function or assigned name) still naming a task in code, each with why; the test fails once one
# is gone, so the list only shrinks
STILL_NAMED: dict[tuple[str, str], str] = {}


def _top_level_name(stmt: ast.stmt) -> str:
    if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return stmt.name
    targets = stmt.targets if isinstance(stmt, ast.Assign) else [getattr(stmt, "target", None)]
    return next((t.id for t in targets if isinstance(t, ast.Name)), f"line {stmt.lineno}")


def _task_names_in_code(name: str, path: Path) -> dict[tuple[str, str], list[int]]:
    """(module, top-level statement) -> lines where a task's name is a string constant and not dict data in a
    NAMED_AS_DATA module."""
    names = {t.NAME for t in tasks.TASKS.values()}
    found: dict[tuple[str, str], list[int]] = {}
    for stmt in ast.parse(path.read_text()).body:
        data = set()
        for node in ast.walk(stmt):
            if isinstance(node, ast.Dict) and name in NAMED_AS_DATA:
                data |= {id(v) for v in [*node.keys, *node.values] if v is not None}
        for node in ast.walk(stmt):
            if isinstance(node, ast.Constant) and node.value in names and id(node) not in data:
                found.setdefault((name, _top_level_name(stmt)), []).append(node.lineno)
    return found


def test_no_module_outside_tasks_names_a_task():
    """See NAMED_AS_DATA for the rule; STILL_NAMED lists what is not yet a capability."""
    found = {}
    for name, path in _modules().items():
        if name != "vislora.tasks" and not name.startswith("vislora.tasks."):
            found.update(_task_names_in_code(name, path))
            assert "_is_detector" not in path.read_text(), f"{name} asks whether a model is a detector"
    new = {k: v for k, v in found.items() if k not in STILL_NAMED}
    assert not new, f"these test or select a task by name (lines): {new}; ask the task (vislora.tasks.OPTIONAL)"
    gone = sorted(set(STILL_NAMED) - set(found))
    assert not gone, f"{gone} no longer name a task: remove them from STILL_NAMED"


def test_no_module_outside_tasks_imports_a_task_module():
    """The task modules (and their helpers) are reached through the registry, vislora.tasks.get, only; what the
    tasks share (tasks.backbone, tasks.common) may be imported anywhere."""
    modules = _modules()
    for name, path in modules.items():
        if name.startswith("vislora.tasks"):
            continue
        direct = sorted({d for d, _ in _imports(path, name, modules) if _task_of(d)})
        assert not direct, f"{name} imports {direct}: use vislora.tasks.get(recipe['task'])"


def _defined(path: Path) -> dict[str, str]:
    """Top-level names of a module and how each is bound: "def" (function, class, assignment) or "import"."""
    out = {}
    for stmt in ast.parse(path.read_text()).body:
        if isinstance(stmt, (ast.Import, ast.ImportFrom)):
            out.update({(a.asname or a.name).split(".")[0]: "import" for a in stmt.names})
        elif isinstance(stmt, (ast.FunctionDef, ast.ClassDef)):
            out[stmt.name] = "def"
        elif isinstance(stmt, (ast.Assign, ast.AnnAssign)):
            targets = stmt.targets if isinstance(stmt, ast.Assign) else [stmt.target]
            out.update({t.id: "def" for t in targets if isinstance(t, ast.Name)})
    return out


@pytest.mark.parametrize("name", sorted(tasks.TASKS))
def test_every_task_provides_the_interface(name):
    """REQUIRED written in the task's own file; an OPTIONAL name either written there too or the registry's default;
    no interface name bound by an import (segmentation's imported pixel `confusion` once passed for the loop's)."""
    module = tasks.get(name)
    assert INTERFACE == tasks.REQUIRED
    own = _defined(Path(module.__file__))
    missing = [attr for attr in INTERFACE if own.get(attr) != "def"]
    assert not missing, f"task {name} does not write {missing}"
    imported = [attr for attr in (*INTERFACE, *tasks.OPTIONAL) if own.get(attr) == "import"]
    assert not imported, f"task {name} imports {imported}: interface names are the task's own (rename the import)"
    for attr, default in tasks.OPTIONAL.items():
        assert own.get(attr) == "def" or getattr(module, attr) is default, (name, attr)
    assert module.NAME == name
    assert set(module.EXPORT) == {"torchscript", "input", "onnx", "served"}


def test_the_guide_lists_the_interface():
    """docs/adding-a-task.md names every REQUIRED and OPTIONAL name."""
    guide = (PACKAGE.parent / "docs" / "adding-a-task.md").read_text()
    absent = [n for n in (*tasks.REQUIRED, *tasks.OPTIONAL) if f"`{n}" not in guide]
    assert not absent, f"docs/adding-a-task.md does not name {absent}"


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


SHARED = {"vislora.tasks", "vislora.tasks.backbone", "vislora.tasks.common"}  # what the tasks share


def _task_of(module: str) -> str | None:
    """The task a module of vislora/tasks/ belongs to, by the registry's names: `detection` for tasks/detection.py
    and tasks/detection_*.py; None for what the tasks share (backbone, common, the interface)."""
    if not module.startswith("vislora.tasks."):
        return None
    stem = module.rpartition(".")[2]
    return next((name for name in tasks.TASKS if stem == name or stem.startswith(name + "_")), None)


def test_every_module_under_tasks_is_a_registered_tasks_or_shared():
    """The registry's task modules are vislora/tasks/<NAME>.py; every other file there is one task's helper
    (<NAME>_*.py) or in SHARED, so the rule below knows whose it is."""
    assert {t.__name__ for t in tasks.TASKS.values()} == {f"vislora.tasks.{n}" for n in tasks.TASKS}
    stray = [m for m in _modules() if m.startswith("vislora.tasks") and m not in SHARED and _task_of(m) is None]
    assert not stray, f"{stray} belong to no registered task: name them <task>_*.py, or add them to SHARED"


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


def test_no_module_over_500_lines():
    long = {name: n for name, path in _modules().items() if (n := len(path.read_text().splitlines())) > 500}
    assert not long, f"split these along a seam: {long}"


def test_few_lines_over_100_characters():
    """timm's files hold 4.5% of lines over 100 characters; vislora held 16% before #26. Under 10% of the package's
    lines (ruff's hard limit stays 120), so a function reads on one screen without sideways scrolling."""
    lines = [line for path in _modules().values() for line in path.read_text().splitlines()]
    share = sum(len(line) > 100 for line in lines) / len(lines)
    assert share < 0.10, f"{share:.1%} of the package's lines are over 100 characters"
