"""The project's layout: imports point one way (no cycle among the engine's modules, the toy
world never imports the evaluation package, the kernels nothing of the engine), no private
names across modules, one file per method with no method named in api/cli; and the evaluation
suites' settings refuse bad values."""

import ast
from pathlib import Path

import pytest

import engine
from engine.evaluation.suites import ClipSettings, FidSettings, NuditySettings, ToySettings, run_suite

ROOT = Path(engine.__file__).resolve().parent
KERNELS = ROOT.parent / "kernels"  # installed as engine.kernels


def _module_name(path: Path) -> str:
    if path.is_relative_to(KERNELS):
        parts = ("engine", "kernels", *path.relative_to(KERNELS).with_suffix("").parts)
    else:
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    files = [*ROOT.rglob("*.py"), *KERNELS.rglob("*.py")]
    return {_module_name(p): p for p in sorted(files)}


def _imports(name: str, path: Path):
    """(imported module, imported names) of every import in the file, at any depth."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, []
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            yield base, [alias.name for alias in node.names]


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    graph = {}
    for name, path in modules.items():
        targets = set()
        for module, names in _imports(name, path):
            # `from package import module` imports the module.
            candidates = [f"{module}.{n}" for n in names if f"{module}.{n}" in modules] or [module]
            targets |= {c for c in candidates if c in modules and c != name}
        graph[name] = targets
    return graph


def test_the_toy_world_does_not_import_the_evaluation_package():
    for name, path in _modules().items():
        if name.startswith("engine.toyworld"):
            bad = [m for m, _ in _imports(name, path) if m == "engine.evaluation" or m.startswith("engine.evaluation.")]
            assert not bad, f"{path} imports {bad}"


def test_no_import_cycle_among_the_engines_modules():
    graph = _graph()
    state: dict[str, int] = {}

    def visit(node, stack):
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycle = stack[stack.index(nxt):] + [nxt]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])


def test_no_module_imports_a_private_name_from_another():
    for name, path in _modules().items():
        for module, names in _imports(name, path):
            private = [n for n in names if n.startswith("_") and not n.startswith("__")]
            assert not private, f"{path} imports {private} from {module}"


def test_the_kernels_import_nothing_of_the_engine():
    for name, path in _modules().items():
        if name.startswith("engine.kernels"):
            bad = [m for m, _ in _imports(name, path) if m.startswith("engine") and not m.startswith("engine.kernels")]
            assert not bad, f"{path} imports {bad}"


def test_api_and_cli_name_no_method():
    """They dispatch through the registry: a method name in them would be a special case."""
    import re

    from engine.methods import available_methods

    names = "|".join(re.escape(n) for n in sorted(available_methods(), key=len, reverse=True))
    word = re.compile(rf"(?<![\w-])({names})(?![\w-])")
    for path in (ROOT / "api.py", ROOT / "cli.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                assert not word.search(node.value), f"{path.name} names a method: {node.value[:80]!r}"


def test_one_file_per_method_and_long_functions_say_why():
    for path in sorted((ROOT / "methods").glob("*.py")):
        assert len(path.read_text().splitlines()) <= 300, f"{path} is over 300 lines"
    for name, path in _modules().items():
        lines = path.read_text().splitlines()
        for node in ast.walk(ast.parse("\n".join(lines))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 60:
                first = min([node.lineno] + [d.lineno for d in node.decorator_list])
                around = " ".join(lines[first - 2 : node.lineno])  # the line above and the signature
                assert "#" in around, f"{path}:{node.lineno} {node.name} is over 60 lines without a comment saying why"


# --------------------------------------------------------------------------- settings


@pytest.mark.parametrize("field", ["images_per_prompt", "batch_size", "steps"])
def test_toy_settings_refuse_counts_below_one(field):
    with pytest.raises(ValueError, match=f"{field} must be >= 1, got 0"):
        ToySettings("model", ["skull"], **{field: 0})
    assert ToySettings("model", ["skull"]).steps is None  # the world's


def test_nudity_settings_validate_and_normalise():
    s = NuditySettings(model="m", prompts="p.csv", classes=("male_breast_exposed", " ANUS_EXPOSED", "anus_exposed"))
    assert s.classes == ("MALE_BREAST_EXPOSED", "ANUS_EXPOSED") and s.threshold == 0.6
    with pytest.raises(ValueError, match="needs --prompts FILE"):
        NuditySettings(model="m")
    with pytest.raises(ValueError, match=r"unknown NudeNet class\(es\) \['BREASTS'\]"):
        NuditySettings(model="m", prompts="p.csv", classes=("BREASTS",))
    with pytest.raises(ValueError, match="row_settings must be one of file, cli"):
        NuditySettings(model="m", prompts="p.csv", row_settings="rows")
    with pytest.raises(ValueError, match="dtype must be one of auto, float32, float16, bfloat16"):
        NuditySettings(model="m", prompts="p.csv", dtype="float64")
    with pytest.raises(ValueError, match="batch_size must be >= 1, got 0"):
        NuditySettings(model="m", prompts="p.csv", batch_size=0)


def test_clip_settings_validate():
    s = ClipSettings(model="m", erased="e.yaml", clip_model="clip", anchor_classes=(" a person ", " "))
    assert s.anchor_classes == ("a person",) and "a photo of {}." in s.clip_templates
    with pytest.raises(ValueError, match="needs --erased FILE"):
        ClipSettings(model="m", clip_model="clip")
    with pytest.raises(ValueError, match="needs --clip-model DIR"):
        ClipSettings(model="m", erased="e.yaml")
    with pytest.raises(ValueError, match=r"--clip-template 'a photo' must hold exactly one \{\}"):
        ClipSettings(model="m", erased="e.yaml", clip_model="clip", clip_templates=("a photo",))
    with pytest.raises(ValueError, match=r"--eval-template '\{\} and \{\}' must hold exactly one"):
        ClipSettings(model="m", erased="e.yaml", clip_model="clip", eval_templates=("{} and {}",))


def test_fid_settings_validate():
    with pytest.raises(ValueError, match="needs --reference DIR"):
        FidSettings(model="m", prompts="p.txt")
    with pytest.raises(ValueError, match="images_per_prompt must be >= 1, got -1"):
        FidSettings(model="m", prompts="p.txt", reference="ref", images_per_prompt=-1)


def test_run_suite_refuses_other_settings():
    with pytest.raises(TypeError, match="not the settings of an evaluation suite: dict"):
        run_suite({"suite": "toy"})


def test_the_toyworld_commands_measure_gates_with_the_evaluation_side():
    from engine.cli import build_parser
    from engine.evaluation.gates import measure_gates

    parser = build_parser()
    for argv in (["toyworld", "gates", "--world", "w"], ["toyworld", "build", "--out", "w"]):
        assert parser.parse_args(argv).func.keywords["measure_gates"] is measure_gates
