"""The folders are the layers: a module imports only from its own layer and the ones below it."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "vae_lightning"
# lowest first; the top-level modules besides the entry points are the base every layer may use
LAYERS = ["base", "model", "data", "figures", "training", "tracking", "runs", "entry points"]
ENTRY_POINTS = {"train", "eval", "report", "export", "plugin_configs", "__init__"}


def _layer(parts: tuple[str, ...]) -> str:
    if (PACKAGE / parts[0]).is_dir() and parts[0] != "conf":
        return parts[0]
    return "entry points" if parts[0].removesuffix(".py") in ENTRY_POINTS else "base"


def test_no_module_imports_from_a_layer_above_its_own():
    upward = []
    for path in PACKAGE.rglob("*.py"):
        own = _layer(path.relative_to(PACKAGE).parts)
        for node in ast.walk(ast.parse(path.read_text())):
            names = [node.module] if isinstance(node, ast.ImportFrom) and node.module else []
            names += [alias.name for alias in node.names] if isinstance(node, ast.Import) else []
            for name in names:
                if name.startswith("vae_lightning."):
                    target = _layer(tuple(name.split(".")[1:]))
                    if LAYERS.index(target) > LAYERS.index(own):
                        upward.append(f"{path.relative_to(PACKAGE)} ({own}) imports {name} ({target})")
    assert upward == []
