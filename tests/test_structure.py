"""Rules of the house, checked on the source: small modules, a core that imports neither the testbed nor the lab,
dependencies
that point one way between packages, and no import cycle. Every import counts: inside functions and inside
`if TYPE_CHECKING:` blocks too (a type-only import is still a dependency a reader has to follow)."""

import ast
from importlib import resources
from pathlib import Path

PACKAGE = Path(str(resources.files("iomm")))
MAX_LINES = 400
# The testbed (nano) and the lab (studies, benchmarks, probes); the library is everything else, its command line too.
PLUGINS = ("nano", "lab")
# The top-level packages and modules of iomm, lowest first. A package imports only from lower layers; those that
# share a layer are peers and import nothing from each other.
LAYERS = (
    ("typed_config", "quiet", "per_sample_rng", "image_tensors", "profiling"),
    ("config",),  # plain dataclasses: their values' checks, nothing that reads a file or the registry
    ("registry", "model_files", "quantize"),
    ("data", "conditioning", "generator"),
    ("config_checks", "ema"),  # the checks against the registry and the files a config names
    ("model",),
    ("checkpointing",),
    ("training",),
    ("inference",),
    ("evaluation",),
    ("footprint", "estimate"),
    ("commands",),
    ("cli", "__init__"),  # loads the testbed's and the lab's commands by entry point, importing neither
    ("nano",),  # the testbed, with its built-ins and commands
    ("lab",),  # the studies, the benchmarks (and the random-weight models they time) and the probes
)


def modules() -> dict[str, Path]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        name = ".".join(("iomm", *parts[:-1])) if parts[-1] == "__init__" else ".".join(("iomm", *parts))
        found[name] = path
    return found


def imports(path: Path, names: set[str]) -> set[str]:
    """The iomm modules `path` imports, at any depth of the file."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names if alias.name.startswith("iomm"))
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("iomm"):
            for alias in node.names:  # `from iomm.x import y` imports module iomm.x.y when there is one
                sub = f"{node.module}.{alias.name}"
                out.add(sub if sub in names else node.module)
    return {name for name in out if name in names}


def graph() -> dict[str, set[str]]:
    found = modules()
    return {name: imports(path, set(found)) for name, path in found.items()}


def package(module: str) -> str:
    """iomm.training.trainer -> training; iomm -> __init__."""
    return module.split(".")[1] if "." in module else "__init__"


def layer(name: str) -> int:
    return next(i for i, peers in enumerate(LAYERS) if name in peers)


def wrong_way(deps: dict[str, set[str]]) -> list[str]:
    """Every import of a package by another that is not below it."""
    return sorted(f"{name} -> {dep}" for name, found in deps.items() for dep in found
                  if package(dep) != package(name) and layer(package(dep)) >= layer(package(name)))


def cycles(deps: dict[str, set[str]]) -> list[list[str]]:
    state: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(name: str) -> None:
        state[name] = 1
        stack.append(name)
        for dep in sorted(deps[name]):
            if state.get(dep) == 1:
                found.append(stack[stack.index(dep):] + [dep])
            elif dep not in state:
                visit(dep)
        stack.pop()
        state[name] = 2

    for name in sorted(deps):
        if name not in state:
            visit(name)
    return found


def packages(deps: dict[str, set[str]]) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {package(name): set() for name in deps}
    for name, found in deps.items():
        out[package(name)].update(package(dep) for dep in found if package(dep) != package(name))
    return out


def test_no_module_is_over_400_lines():
    long = {name: n for name, path in modules().items() if (n := len(path.read_text().splitlines())) > MAX_LINES}
    assert not long, long


def test_every_package_has_its_layer():
    placed = [name for peers in LAYERS for name in peers]
    assert len(placed) == len(set(placed))
    assert set(packages(graph())) == set(placed)


def test_the_library_imports_nothing_from_the_testbed_or_the_lab():
    offenders = {name: sorted(d for d in deps if package(d) in PLUGINS)
                 for name, deps in graph().items() if package(name) not in PLUGINS}
    assert not {k: v for k, v in offenders.items() if v}
    assert not [name for name, deps in graph().items() if package(name) == "nano" and any(
        package(d) == "lab" for d in deps)]  # the testbed does not import the lab either


def test_dependencies_point_one_way():
    assert not wrong_way(graph())


def test_there_is_no_import_cycle_of_modules_or_packages():
    deps = graph()
    assert not cycles(deps)
    assert not cycles(packages(deps))


def test_the_checks_fail_on_a_planted_upward_import_and_cycle():
    """The rules are only as good as their checks: plant what they must catch."""
    deps = graph()
    deps["iomm.config"] = deps["iomm.config"] | {"iomm.training.trainer"}  # the config reaching up to the trainer
    assert wrong_way(deps) == ["iomm.config -> iomm.training.trainer"]
    assert any({"config", "training"} <= set(cycle) for cycle in cycles(packages(deps)))
    deps = graph()
    deps["iomm.data.spec"] = deps["iomm.data.spec"] | {"iomm.generator.codec"}  # peers
    assert wrong_way(deps) == ["iomm.data.spec -> iomm.generator.codec"]


def test_the_checker_sees_lazy_and_type_only_imports():
    """The scan must find a function-level import and one inside `if TYPE_CHECKING:`."""
    deps = graph()
    assert "iomm.training.trainer" in deps["iomm.commands.train"]  # imported inside _pretrain
    assert "iomm.config" in deps["iomm.registry"]  # only under TYPE_CHECKING
