"""Rules of the house, checked on the source: small modules, a core that never imports the testbed,
and no import cycle (imports inside functions count; `if TYPE_CHECKING:` blocks do not)."""

import ast
from importlib import resources
from pathlib import Path

PACKAGE = Path(str(resources.files("iomm")))
MAX_LINES = 400
# Everything but the testbed (nano), the command line and the studies of the testbed.
CORE = ("config", "typed_config", "builtins", "model", "describe", "image_tensors", "conditioning", "generator",
        "checkpointing", "training", "data", "inference", "evaluation")


def modules() -> dict[str, Path]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        name = ".".join(("iomm", *parts[:-1])) if parts[-1] == "__init__" else ".".join(("iomm", *parts))
        found[name] = path
    return found


def _type_checking_block(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def imports(path: Path, names: set[str]) -> set[str]:
    """The iomm modules `path` imports, at any depth of the file."""
    out: set[str] = set()

    def visit(node: ast.AST) -> None:
        if _type_checking_block(node):
            return
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names if alias.name.startswith("iomm"))
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("iomm"):
            for alias in node.names:  # `from iomm.x import y` imports module iomm.x.y when there is one
                sub = f"{node.module}.{alias.name}"
                out.add(sub if sub in names else node.module)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text(encoding="utf-8")))
    return {name for name in out if name in names}


def graph() -> dict[str, set[str]]:
    found = modules()
    return {name: imports(path, set(found)) for name, path in found.items()}


def test_no_module_is_over_400_lines():
    long = {name: n for name, path in modules().items() if (n := len(path.read_text().splitlines())) > MAX_LINES}
    assert not long, long


def test_the_core_imports_nothing_from_the_testbed():
    offenders = {name: sorted(d for d in deps if d.startswith("iomm.nano"))
                 for name, deps in graph().items() if name.split(".")[1:2] and name.split(".")[1] in CORE}
    assert not {k: v for k, v in offenders.items() if v}


def test_there_is_no_import_cycle():
    deps = graph()
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(name: str) -> None:
        state[name] = 1
        stack.append(name)
        for dep in sorted(deps[name]):
            if state.get(dep) == 1:
                cycles.append(stack[stack.index(dep):] + [dep])
            elif dep not in state:
                visit(dep)
        stack.pop()
        state[name] = 2

    for name in sorted(deps):
        if name not in state:
            visit(name)
    assert not cycles, cycles


def test_the_checker_sees_lazy_imports():
    """The rules above are only as good as the import scan: a function-level import must be found."""
    deps = graph()
    assert "iomm.training.trainer" in deps["iomm.commands.train"]  # imported inside _pretrain
    assert "iomm.nano.builtins" in deps and "iomm.builtins" in deps["iomm.nano.builtins"]
