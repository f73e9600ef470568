"""The package's shape, read from its source: imports run one way, the loop asks the task, one image reader."""

import ast
from pathlib import Path

import pytest

from vislora import tasks

PACKAGE = Path(__file__).resolve().parent.parent / "vislora"
INTERFACE = ("NAME", "SCORE", "EXPORT", "build", "build_model", "adapt", "loss", "validate", "health", "predictor",
             "evaluate", "format_report", "example_inputs", "predict", "format_prediction")
LAZY_OK = {"peft", "pycocotools", "onnx", "onnxruntime", "matplotlib"}  # optional or heavy: may be imported late


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
                roots = {a.name.split(".")[0] for a in node.names} if isinstance(node, ast.Import) else \
                    {(node.module or "").split(".")[0]}
                assert roots <= LAZY_OK, f"{name}:{node.lineno} imports {roots} inside a function"


@pytest.mark.parametrize("module", ["train.py", "evaluate.py", "export.py", "rundir.py", "serve.py"])
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
    assert roots <= {"__future__", "math", "os", "collections", "numpy", "PIL"}, roots  # no vislora, timm ...
