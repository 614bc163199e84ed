"""The package's shape stays as docs and README describe it: imports flow one way (command line and mixin →
transfer → models / matching / projection → registry / options / LoRA reading → math), with no cycle; modules stay
under 350 lines and functions at most 60 lines besides their docstring."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "diffusers_lorax"

#: Layer of each module (a module imports only from its own layer or below). Unlisted modules fail the test.
LAYERS = {
    0: ["_version", "_lazy", "progress", "umask", "threads", "errors", "subspace", "report", "plot", "held", "quantized",
        "weights", "weight_files", "formats.safetensors_check", "hub_access", "estimate"],
    1: ["methods", "options", "lora", "lora_config", "transferred", "registry", "registry.location", "registry.database",
        "registry.blobs", "registry.families",
        "registry.maintenance", "registry.transaction", "registry.store",
        "formats", "formats.common", "formats.fetch", "formats.skeleton",
        "formats.lycoris", "formats.lora_diffusion", "formats.kohya",
        "architectures", "architectures.layout", "architectures.unet", "architectures.blocks", "architectures.mmdit",
        "architectures.dit"],
    2: ["models", "matching", "projection", "correspondence", "probe", "probe_run", "swap", "probe_models",
        "calibration",
        "adapters", "adapters.config", "adapters.bases", "adapters.layers", "adapters.files", "adapters.saving", "adapters.loading",
        "adapters.hub"],
    3: ["transfer", "inspection", "inspect_reading", "injection", "snapshot"],
    4: ["mixin", "_install", "cli", "demo", "__main__", "__init__", "toy", "tiny", "tiny.loras", "tiny.runnable", "quality",
        "quality.data", "quality.classifiers", "quality.evaluate", "quality.dit"],
}
LAYER = {name: layer for layer, names in LAYERS.items() for name in names}


def _name(path: Path) -> str:
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(parts[:-1]) if parts[-1] == "__init__" and len(parts) > 1 else ".".join(parts)


def _imports(path: Path, name: str) -> set[str]:
    """Package modules that ``path`` imports (relative or absolute), by dotted name within the package."""
    package = name.split(".")[:-1] if path.name != "__init__.py" else name.split(".")
    if name == "__init__":
        package = []
    tree = ast.parse(path.read_text())
    type_only = {id(n) for block in ast.walk(tree) if isinstance(block, ast.If) and getattr(block.test, "id", "") ==
                 "TYPE_CHECKING" for n in ast.walk(block)}  # annotations only: not an import at run time
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and id(node) not in type_only:
            if node.level:
                base = package[: len(package) - node.level + 1]
                module = ".".join([*base, *(node.module.split(".") if node.module else [])])
            elif node.module and node.module.startswith("diffusers_lorax"):
                module = node.module.removeprefix("diffusers_lorax").lstrip(".")
            else:
                continue
            candidates = [module] if module else []
            candidates += [f"{module}.{a.name}".lstrip(".") for a in node.names]
            found |= {c for c in candidates if c in LAYER}
    return found - {name}


def test_every_module_has_a_layer_and_imports_only_downwards():
    graph = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        name = _name(path)
        assert name in LAYER, f"{name} has no layer in tests/test_layout.py"
        graph[name] = _imports(path, name)
        upward = {m for m in graph[name] if LAYER[m] > LAYER[name]}
        assert not upward, f"{name} (layer {LAYER[name]}) imports {upward} from above"
    # and no cycle within a layer
    state: dict[str, int] = {}

    def visit(node, trail):
        assert state.get(node) != 1, f"import cycle: {' → '.join(trail + [node])}"
        if state.get(node) == 2:
            return
        state[node] = 1
        for nxt in graph.get(node, ()):
            visit(nxt, trail + [node])
        state[node] = 2

    for node in graph:
        visit(node, [])


def test_modules_and_functions_stay_small():
    for path in sorted(PACKAGE.rglob("*.py")):
        source = path.read_text()
        assert len(source.splitlines()) <= 350, f"{path.name}: {len(source.splitlines())} lines"
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                # the code counts, not the docstring (a public function's Args/Raises may be long)
                first = node.body[0]
                docstring = isinstance(first, ast.Expr) and isinstance(getattr(first, "value", None), ast.Constant)
                lines = (node.end_lineno - node.lineno + 1) - ((first.end_lineno - first.lineno + 1) if docstring else 0)
                assert lines <= 60, f"{path.name}:{node.name} has {lines} lines of code"
