"""The package's architecture: no import cycles, a cheap and lazy ``import anomalyclip``, and
torch-free modules where torch is not needed.

The import graph is built from the sources with ``ast``: every ``import`` statement counts, at
module level, inside functions and under ``if TYPE_CHECKING:`` alike.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE_DIR = Path(__file__).resolve().parents[1] / "anomalyclip"
ROOT = PACKAGE_DIR.parent


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in PACKAGE_DIR.rglob("*.py")}


def _resolve(module: str, is_package: bool, level: int, target: str | None) -> str:
    if level == 0:
        return target or ""
    base = module.split(".")
    base = base if is_package else base[:-1]
    base = base[: len(base) - (level - 1)]
    return ".".join(base + ([target] if target else []))


def import_graph() -> dict[str, set[str]]:
    """Module -> the package modules it imports (any ``import`` statement anywhere in it)."""
    modules = _modules()
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = _resolve(name, is_package, node.level, node.module)
                targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
            for target in targets:
                # the module itself, or the longest package module that the dotted name starts with
                while target and target not in modules:
                    target = target.rpartition(".")[0]
                if target.startswith("anomalyclip") and target in modules and target != name:
                    graph[name].add(target)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a list of modules (first == last), or None."""
    state: dict[str, int] = {}  # 1 on the stack, 2 done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_graph_builder_sees_every_kind_of_import():
    """The checker itself: in-function, TYPE_CHECKING and relative imports are all edges."""
    graph = import_graph()
    assert "anomalyclip.train.finetune" in graph["anomalyclip.model.training"]  # in-function (model.finetune)
    assert "anomalyclip.model" in graph["anomalyclip"]  # under TYPE_CHECKING
    assert "anomalyclip.errors" in graph["anomalyclip.train.losses"]  # relative, two levels
    # and it finds a planted cycle
    planted = {k: set(v) for k, v in graph.items()}
    planted["anomalyclip.errors"].add("anomalyclip.model")
    assert find_cycle(planted) is not None


def test_no_import_cycles():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


# Modules at or below the model: they must not reach up into I/O, training, evaluation, deployment.
_MODEL_LAYER = (
    "anomalyclip.errors",
    "anomalyclip.config",
    "anomalyclip.files",
    "anomalyclip.runtime",
    "anomalyclip.hub",
    "anomalyclip.decoding",
    "anomalyclip.preprocessing",
    "anomalyclip.outputs",
    "anomalyclip.ops",
    "anomalyclip.scoring",
    "anomalyclip.references",
    "anomalyclip.tiling",
    "anomalyclip.vision",
    "anomalyclip.prompts",
    "anomalyclip.backbone",
    "anomalyclip.official",
    "anomalyclip.presets",
    "anomalyclip.options",
    "anomalyclip.model",
    "anomalyclip.model.module",
    "anomalyclip.model.factory",
    "anomalyclip.model.persistence",
    "anomalyclip.model.fewshot",
    "anomalyclip.model.predict",
    "anomalyclip.model.training",
    "anomalyclip.model.api",
    "anomalyclip.predictor",
    "anomalyclip.predictor.stream",
    "anomalyclip.predictor.thresholds",
)
_UPPER = (
    "anomalyclip.train",
    "anomalyclip.data",
    "anomalyclip.eval.protocol",
    "anomalyclip.cli",
    "anomalyclip.visualize",
    "anomalyclip.predict_io",
    "anomalyclip.distributed",
    "anomalyclip.onnx",
    "anomalyclip.serve",
)


def test_model_layer_does_not_import_upper_layers():
    graph = import_graph()
    # Methods that delegate up, in-function: model.finetune (model.training) and model.export_onnx (model.api).
    allowed = {
        ("anomalyclip.model.training", "anomalyclip.train"),
        ("anomalyclip.model.training", "anomalyclip.train.finetune"),
        ("anomalyclip.model.api", "anomalyclip.onnx"),
        ("anomalyclip.model.api", "anomalyclip.onnx.export"),
    }
    wrong = sorted(
        (module, target)
        for module in _MODEL_LAYER
        for target in graph[module]
        if target.startswith(_UPPER) and (module, target) not in allowed
    )
    assert wrong == []


def _run(code: str) -> str:
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def test_import_anomalyclip_is_lazy():
    out = _run(
        "import sys, anomalyclip\n"
        "heavy = [m for m in ('torch', 'open_clip', 'scipy', 'PIL', 'anomalyclip.model') if m in sys.modules]\n"
        "print(anomalyclip.__version__, heavy)"
    )
    version, heavy = out.split(" ", 1)
    assert heavy == "[]"
    import anomalyclip

    assert version == anomalyclip.__version__


def test_lazy_names_resolve_and_unknown_names_fail():
    import anomalyclip

    for name in anomalyclip.__all__:
        assert getattr(anomalyclip, name) is not None
    assert anomalyclip.Thresholds.__module__ == "anomalyclip.eval.thresholds"
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        anomalyclip.nope  # noqa: B018


def test_torch_free_modules_import_without_torch():
    """Preprocessing, results, config and files work with torch and open_clip blocked."""
    out = _run(
        "import sys\n"
        "sys.modules['torch'] = None; sys.modules['open_clip'] = None\n"
        "import numpy as np\n"
        "from anomalyclip.preprocessing import preprocess_array, mask_array\n"
        "from anomalyclip.outputs import AnomalyResult\n"
        "from anomalyclip.config import AnomalyCLIPConfig\n"
        "import anomalyclip.files, anomalyclip.eval.thresholds, anomalyclip.predictor, anomalyclip.options\n"
        "x = preprocess_array('tests/fixtures/golden/image_a.png', 224)\n"
        "r = AnomalyResult(score=0.5, anomaly_map=np.zeros((4, 4), np.float32))\n"
        "print(x.shape, AnomalyCLIPConfig().image_size)"
    )
    assert out == "(3, 224, 224) 518"


def test_numpy_preprocessing_is_the_torch_preprocessing():
    import numpy as np

    from anomalyclip.preprocessing import preprocess_array, preprocess_image

    path = ROOT / "tests" / "fixtures" / "golden" / "image_a.png"
    a = preprocess_array(path, 224)
    t = preprocess_image(path, 224)
    assert np.array_equal(a, t.numpy())
