"""The shape rules of docs/architecture.md, checked from the source (AST, nothing imported): layers import only
downwards, no import cycle among the project's modules, no private name imported across modules, no module over 450
lines. A new package or top-level module must be placed in LAYERS (the diagram of docs/architecture.md#layers)."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PACKAGES = {"qops": REPO / "qops", "qops_airflow": REPO / "operators"}

# top to bottom, as drawn in docs/architecture.md; a module may import its own row and the rows below it
LAYERS = [
    ["qops_airflow"],
    ["qops.cli"],
    ["qops.pipeline"],
    ["qops.modality"],
    ["qops.engines"],
    ["qops.qat", "qops.llm", "qops.examples"],
    ["qops.cards", "qops.gates", "qops.preflight"],
    ["qops.evaluate"],
    ["qops.quantize"],
    ["qops.calibration"],
    ["qops.registry", "qops.alias_events", "qops.alias_webhook"],
    ["qops.data", "qops.datasets"],
    ["qops.spec", "qops.qat.plan", "qops.qat.config"],  # spec validates QAT plans without importing a stage
    ["qops.targets"],
    ["qops", "qops.programs", "qops.runtime", "qops.run_folder", "qops.artifacts", "qops.locks", "qops.errors",
     "qops.redact", "qops.stats", "qops.metric_names", "qops.mlflow_store"],
]
MAX_LINES = 450


def _modules() -> dict[str, Path]:
    mods = {}
    for name, folder in PACKAGES.items():
        for f in folder.rglob("*.py"):
            rel = f.relative_to(folder).with_suffix("")
            mods[".".join([name] + [p for p in rel.parts if p != "__init__"])] = f
    return mods


MODS = _modules()


def _imports(mod: str, tree: ast.AST) -> list[tuple[str, str | None, int]]:
    """(imported project module, imported name or None, line) for every import, module- or function-level."""
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, None, node.lineno) for a in node.names if a.name.split(".")[0] in PACKAGES]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = mod.split(".")
                keep = len(base) - node.level + (1 if MODS[mod].name == "__init__.py" else 0)
                target = ".".join(base[:keep] + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] not in PACKAGES:
                continue
            for a in node.names:
                full = f"{target}.{a.name}"
                out.append((full, None, node.lineno) if full in MODS else (target, a.name, node.lineno))
    return out


TREES = {m: ast.parse(f.read_text()) for m, f in MODS.items()}
EDGES = {m: _imports(m, t) for m, t in TREES.items()}


def _rank(mod: str) -> int:
    best, rank = -1, None
    for i, row in enumerate(LAYERS):
        for prefix in row:
            if (mod == prefix or mod.startswith(prefix + ".")) and len(prefix) > best:
                best, rank = len(prefix), i
    assert rank is not None, f"{mod} is in no layer: place it in LAYERS (and in docs/architecture.md#layers)"
    return rank


def test_every_module_has_a_layer_and_imports_only_downwards():
    upward = []
    for mod, edges in EDGES.items():
        for target, _name, line in edges:
            target = target if target in MODS else target.rsplit(".", 1)[0]
            if target in MODS and _rank(target) < _rank(mod):
                upward.append(f"{MODS[mod].relative_to(REPO)}:{line} imports {target} (a layer above)")
    assert not upward, "\n".join(upward)


def test_no_import_cycle():
    graph = {m: {t if t in MODS else t.rsplit(".", 1)[0] for t, _, _ in e} & set(MODS) - {m} for m, e in EDGES.items()}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                return stack[stack.index(n):] + [n]
            if n not in state:
                found = visit(n)
                if found:
                    return found
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state:
            cycle = visit(m)
            assert cycle is None, " -> ".join(cycle)


def test_no_private_name_crosses_modules():
    bad = [f"{MODS[m].relative_to(REPO)}:{line} imports {name} from {t}" for m, e in EDGES.items()
           for t, name, line in e if name and name.startswith("_") and not name.startswith("__") and t != m]
    assert not bad, "\n".join(bad)


def test_no_module_over_450_lines():
    long = [f"{f.relative_to(REPO)}: {n}" for f in MODS.values() if (n := f.read_text().count("\n")) > MAX_LINES]
    assert not long, "\n".join(long)


def test_the_layer_check_catches_an_upward_import():
    """The check itself can fail: a targets module importing the pipeline is reported."""
    tree = ast.parse("from qops.pipeline import run_pipeline\n")
    edges = _imports("qops.targets.cpu", tree)
    assert edges and _rank(edges[0][0]) < _rank("qops.targets.cpu")


# RunLayout (qops/run_folder.py) is the only place a run-folder path is composed: no other module spells a stage file
STAGE_FILES = ("run.json", "source.json", "quantize.json", "evaluation.json", "gate.json", "card.json",
               "register.json", "approval.json", "promote.json", "summary.json")
SCANNED = [*MODS.values(), *(f for d in ("dags", "bench", "scripts") for f in (REPO / d).rglob("*.py"))]
ALLOWED = {
    # write_card names the files of a rendered card (card.md, card.html, card.json, charts) in whatever folder it is
    # given; this card.json is the card's own data inside card/, not the target's card-stage record, and it is named
    # beside its siblings (RunLayout names the folder: TargetFolder.card_dir)
    ("qops/cards/__init__.py", "card.json"),
    # the benchmark's own results file, bench/results/quantize.json: no run folder is involved
    ("bench/bench_quantize.py", "quantize.json"),
}


def _stage_file_literals(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, name) for every string constant (f-string parts included) that is a stage file name or a path
    ending in one; prose that merely mentions a name (docstrings, help texts) is not a path."""
    return [(node.lineno, name) for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and isinstance(node.value, str)
            for name in STAGE_FILES if node.value == name or node.value.endswith(("/" + name, "\\" + name))]


def test_only_run_layout_spells_a_run_folder_file_name():
    bad = []
    for f in SCANNED:
        rel = f.relative_to(REPO).as_posix()
        if rel == "qops/run_folder.py":
            continue
        bad += [f"{rel}:{line} spells {name!r}: use qops.run_folder.RunLayout"
                for line, name in _stage_file_literals(ast.parse(f.read_text())) if (rel, name) not in ALLOWED]
    assert not bad, "\n".join(bad)


def test_the_run_layout_check_catches_a_composed_path():
    tree = ast.parse('p = tdir / "gate.json"\nq = f"{run_dir}/summary.json"\n"""Reads ``gate.json``."""\n')
    assert [name for _, name in _stage_file_literals(tree)] == ["gate.json", "summary.json"]
