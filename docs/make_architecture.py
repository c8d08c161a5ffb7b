"""Draw `docs/architecture.png`: the package's layers with their real modules and imports, and one step's data path.

    OMP_NUM_THREADS=1 .venv/bin/python docs/make_architecture.py [--out docs/architecture.png]

Nothing is drawn by hand. Panel (a) lists every module of each layer, read from the package tree, and the imports
between layers, read from the source with `ast` (`layer_imports`, also what `tests/test_architecture.py` checks:
imports only go downward). Panel (b) is the data path of one training step; each box names the object that does that
part, and the script fails if one of them no longer exists, so the picture cannot drift from the code.
"""

from __future__ import annotations

import argparse
import ast
import importlib
from collections import Counter
from pathlib import Path

DOCS = Path(__file__).resolve().parent
PACKAGE_DIR = DOCS.parent / "trl_prefix_share"
DEFAULT_OUT = DOCS / "architecture.png"

#: Layers from the top down: a module may import its own layer or those below it, never above.
LAYERS = ("commands", "trainers", "core")

#: One step, in order: (what happens, the object that does it).
DATA_PATH = (
    ("TRL's collator pads [chosen; rejected]", "trl.trainer.dpo_trainer:DataCollatorForPreference"),
    ("our collator adds the packed layout", "trl_prefix_share.core.preference.collator:PrefixSharedPreferenceCollator"),
    ("prompt once, one branch per response", "trl_prefix_share.core.layout:pack_documents"),
    ("TRL's _compute_loss calls model(...)", "trl.trainer.dpo_trainer:DPOTrainer._compute_loss"),
    ("packed forward on the packed rows", "trl_prefix_share.core.packed_forward:install_packed_forward"),
    ("block-sparse attention, every layer", "trl_prefix_share.core.attention:prefix_share_attention_forward"),
    ("per-token results scattered back", "trl_prefix_share.core.packed_forward:scatter_to_virtual"),
    ("TRL's own loss code, unchanged", "trl.trainer.dpo_trainer:DPOTrainer._compute_loss"),
)


def layer_of(module: str) -> str:
    """`trl_prefix_share.core.layout` -> `core`; the package root (public names) is its own layer, `root`."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in LAYERS else "root"


def package_modules() -> dict[str, Path]:
    """Every module of the package, by dotted name."""
    modules = {}
    for path in sorted(PACKAGE_DIR.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE_DIR.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


def imported_modules(path: Path, module: str, known: set[str] | frozenset[str] = frozenset()) -> set[str]:
    """The package modules `path` imports (absolute or relative, at any depth of the file). With ``known`` (module
    names), `from package import submodule` counts as importing the submodule too."""
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            found.add(name)
            found.update(f"{name}.{alias.name}" for alias in node.names if f"{name}.{alias.name}" in known)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {name for name in found if name.split(".")[0] == "trl_prefix_share"}


def layer_imports() -> list[tuple[str, str]]:
    """(importing module, imported module) for every import between two different layers of the package."""
    edges = []
    for module, path in package_modules().items():
        for target in imported_modules(path, module):
            if layer_of(target) != layer_of(module):
                edges.append((module, target))
    return sorted(edges)


def upward_imports() -> list[tuple[str, str]]:
    """Imports that break the rule: a lower layer importing a higher one (the root may import every layer)."""
    rank = {name: index for index, name in enumerate(LAYERS)}
    return [
        (source, target)
        for source, target in layer_imports()
        if layer_of(source) in rank and layer_of(target) in rank and rank[layer_of(target)] < rank[layer_of(source)]
    ]


def import_graph() -> dict[str, set[str]]:
    """Every module's imports of other package modules (at any depth of the file: a deferred import is still one)."""
    modules = package_modules()
    return {
        module: {
            target for target in imported_modules(path, module, set(modules)) if target in modules and target != module
        }
        for module, path in modules.items()
    }


def import_cycles() -> list[list[str]]:
    """Groups of modules that import each other, directly or round a loop (strongly connected components of the
    import graph with more than one module), inside a layer or across layers; each sorted, the list sorted."""
    graph = import_graph()
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(module: str) -> None:  # Tarjan's algorithm; the package is small enough for recursion
        index[module] = low[module] = len(index)
        stack.append(module)
        on_stack.add(module)
        for target in sorted(graph[module]):
            if target not in index:
                visit(target)
                low[module] = min(low[module], low[target])
            elif target in on_stack:
                low[module] = min(low[module], index[target])
        if low[module] == index[module]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == module:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for module in sorted(graph):
        if module not in index:
            visit(module)
    return sorted(cycles)


def resolve(dotted: str) -> object:
    """`module:attr.attr` -> the object (raises if it no longer exists)."""
    module_name, _, attributes = dotted.partition(":")
    value: object = importlib.import_module(module_name)
    for attribute in attributes.split("."):
        value = getattr(value, attribute)
    return value


def draw(out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import FancyBboxPatch

    for _, dotted in DATA_PATH:
        resolve(dotted)
    modules = package_modules()
    by_layer: dict[str, list[str]] = {layer: [] for layer in LAYERS}
    for module in modules:
        if layer_of(module) in by_layer and module.count(".") >= 2:
            by_layer[layer_of(module)].append(module.split(".", 2)[2])
    counts = Counter((layer_of(s), layer_of(t)) for s, t in layer_imports())

    figure, (top, bottom) = plt.subplots(2, 1, figsize=(15, 11), gridspec_kw={"height_ratios": [3, 1.4]})
    colours = {"commands": "#f2cf5b", "trainers": "#8cc5e3", "core": "#9fd39a"}
    columns = 5
    rows = {layer: -(-len(by_layer[layer]) // columns) for layer in LAYERS}
    row_height = 0.9 / (sum(rows.values()) + 3.5 * len(LAYERS))
    heights = {layer: (rows[layer] + 2.5) * row_height for layer in LAYERS}
    y = 1.0
    centres = {}
    for layer in LAYERS:
        y -= heights[layer] + 0.02
        top.add_patch(
            FancyBboxPatch((0.02, y), 0.96, heights[layer], boxstyle="round,pad=0.005", fc=colours[layer], ec="#333")
        )
        names = sorted(by_layer[layer])
        top.text(0.03, y + heights[layer] - row_height, f"{layer}/  ({len(names)} modules)", fontsize=12, weight="bold")
        for index, name in enumerate(names):
            row, column = divmod(index, columns)
            top.text(
                0.04 + column * 0.19,
                y + heights[layer] - 2.2 * row_height - row * row_height,
                name,
                fontsize=8,
                family="monospace",
            )
        centres[layer] = y + heights[layer] / 2
    bottoms = {layer: centres[layer] - heights[layer] / 2 for layer in LAYERS}
    for (source, target), count in sorted(counts.items()):
        if source in centres and target in centres:
            adjacent = LAYERS.index(target) - LAYERS.index(source) == 1
            x = 0.5 if adjacent else 0.992
            start, end = bottoms[source], bottoms[target] + heights[target]
            top.annotate(
                "", xy=(x, end), xytext=(x, start), arrowprops={"arrowstyle": "->", "color": "#333", "lw": 1.5}
            )
            top.text(x + 0.006, (start + end) / 2, f"{count} imports", fontsize=8, va="center")
    top.set_xlim(0, 1)
    top.set_ylim(0, 1)
    top.axis("off")
    top.set_title(
        "(a) layers: modules read from the package tree; arrows = imports between layers (counted from the source), "
        "only downward; no import cycles",
        fontsize=11,
    )

    per_row = 4
    width = 1 / per_row
    for index, (label, dotted) in enumerate(DATA_PATH):
        row, column = divmod(index, per_row)
        x, y0 = column * width + 0.01, 0.55 - row * 0.5
        ours = dotted.startswith("trl_prefix_share")
        bottom.add_patch(
            FancyBboxPatch(
                (x, y0), width - 0.04, 0.38, boxstyle="round,pad=0.01", fc="#9fd39a" if ours else "#dddddd", ec="#333"
            )
        )
        centre = x + (width - 0.04) / 2
        bottom.text(centre, y0 + 0.25, f"{index + 1}. {label}", ha="center", va="center", fontsize=9)
        bottom.text(centre, y0 + 0.1, dotted.split(":")[-1], ha="center", va="center", fontsize=8, family="monospace")
        if column:
            bottom.annotate(
                "", xy=(x - 0.005, y0 + 0.19), xytext=(x - 0.035, y0 + 0.19), arrowprops={"arrowstyle": "->"}
            )
    bottom.set_xlim(0, 1)
    bottom.set_ylim(0, 1)
    bottom.axis("off")
    bottom.set_title(
        "(b) one DPO step: grey = TRL, green = this package (each box names the object doing it)", fontsize=11
    )
    figure.tight_layout()
    figure.savefig(out, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    draw(parser.parse_args().out)


if __name__ == "__main__":
    main()
