"""The package's seams, checked on its source: task kinds stay inside `jaxkd/tasks/`, modules stay
small, and nothing imports in a cycle."""
import ast
import dataclasses
import pathlib

import jaxkd
from jaxkd import model, tasks
from jaxkd.config import Config

PACKAGE = pathlib.Path(jaxkd.__file__).resolve().parent
MAX_LINES = 520  # "about 500": a module past this mixes concerns and should be split


def _modules() -> dict[str, pathlib.Path]:
    return {".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts): path
            for path in sorted(PACKAGE.rglob("*.py"))}


def _docstrings(tree: ast.AST) -> set[int]:
    """ids of the string nodes that are docstrings (of the module, classes and functions)."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
                    and isinstance(body[0].value.value, str):
                found.add(id(body[0].value))
    return found


def test_no_module_outside_tasks_names_a_head_kind_or_task_type():
    names = set(model.HEADS) | set(tasks.KINDS)
    assert {"sequence", "token", "span", "sequence_classification"} <= names  # the check bites
    found = []
    for module, path in _modules().items():
        if module.startswith("jaxkd.tasks."):
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        docs = _docstrings(tree)
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) \
                    and node.value in names and id(node) not in docs:
                found.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno}: {node.value!r}")
    assert not found, "kind-specific code outside jaxkd/tasks/ (ask the task kind instead):\n" + \
        "\n".join(found)


def test_no_module_is_larger_than_about_500_lines():
    sizes = {module: len(path.read_text(encoding="utf-8").splitlines())
             for module, path in _modules().items()}
    assert not {m: n for m, n in sizes.items() if n > MAX_LINES}


def _imports(module: str, path: pathlib.Path) -> set[str]:
    """The jaxkd modules `module` imports when it is imported (module level and class bodies;
    imports inside functions run later and cannot form an import-time cycle)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    out = set()

    def visit(body):
        for node in body:
            if isinstance(node, ast.Import):
                out.update(a.name for a in node.names if a.name.startswith("jaxkd"))
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1]
                                    + ([node.module] if node.module else []))
                if base.startswith("jaxkd"):
                    out.add(base)
                    out.update(f"{base}.{a.name}" for a in node.names)
            elif isinstance(node, ast.If) and ast.unparse(node.test).endswith("TYPE_CHECKING"):
                continue  # for type checkers only: never imported at run time
            elif isinstance(node, (ast.ClassDef, ast.If, ast.Try)):
                visit(getattr(node, "body", []))
    visit(tree.body)
    return out


def test_no_import_cycles():
    modules = _modules()
    graph = {m: {i for i in _imports(m, p) if i in modules and i != m} for m, p in modules.items()}
    # A package's __init__ importing its own submodules is how a package is built, not a cycle.
    for m in graph:
        graph[m] = {i for i in graph[m] if not (i.startswith(m + ".") and modules[m].name == "__init__.py")}
    state: dict[str, int] = {}
    cycles = []

    def walk(node, stack):
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                walk(nxt, stack + [nxt])
        state[node] = 2

    for m in sorted(graph):
        if m not in state:
            walk(m, [m])
    assert not cycles, "\n".join(" -> ".join(c) for c in cycles)


# Which sections of the run config (`cfg.<section>`) each module may read; a module not named
# reads none: it is handed its own section (or the values it needs) by one of these.
_ALL = {f.name for f in dataclasses.fields(Config)} - {"workdir", "seed", "compilation_cache"}
SECTION_READERS = {
    "jaxkd.config": _ALL, "jaxkd.plan": _ALL, "jaxkd.trainer": _ALL, "jaxkd.manifest": _ALL,
    "jaxkd.launch": _ALL,  # the composers: they resolve the config and hand out its sections
    "jaxkd.loop": {"data", "checkpoint", "log"},  # Runtime: batch geometry, checkpoints, logging
    "jaxkd.report": {"teacher", "student", "distill", "precision"},  # what it describes
    "jaxkd.evaluate": {"data", "task"},  # scores a model on a run config's split
}


def test_no_module_reads_a_config_section_that_is_not_its_own():
    assert {"data", "distill", "log", "distributed"} <= _ALL  # the check bites
    found = []
    for module, path in _modules().items():
        allowed = SECTION_READERS.get(module, set())
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) \
                    and node.value.id in ("cfg", "config", "run_cfg") and node.attr in _ALL \
                    and node.attr not in allowed:
                found.append(f"{module}:{node.lineno}: {node.value.id}.{node.attr}")
    assert not found, "\n".join(found)


def test_importing_the_corpus_reader_does_not_import_jax():
    """The tokenizer's spawned workers import jaxkd.data.corpus: the package's public names are
    imported on first use, so a worker loads neither JAX nor the models (nor does train.py's
    re-import as the workers' __main__)."""
    import subprocess
    import sys

    code = ("import sys, runpy; import jaxkd.data.corpus; "
            "runpy.run_path('train.py', run_name='__mp_main__'); "
            "print(sorted(m for m in ('jax', 'flax', 'optax', 'jaxkd.model', 'jaxkd.tasks') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=PACKAGE.parent, capture_output=True, text=True,
                         check=True, timeout=120)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
    # and the names stay reachable: the first use imports them
    code = "import jaxkd; print(jaxkd.BertConfig.__module__, jaxkd.resolve_task.__name__, jaxkd.data.Encoded.__name__)"
    out = subprocess.run([sys.executable, "-c", code], cwd=PACKAGE.parent, capture_output=True, text=True,
                         check=True, timeout=120)
    assert out.stdout.split() == ["jaxkd.model", "resolve", "Encoded"]
