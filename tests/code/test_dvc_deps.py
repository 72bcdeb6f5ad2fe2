"""dvc.yaml is exact: each stage declares the code it runs, the data it reads and the params it reads.

The code a stage runs is computed from the code: every first-party module ``stages/<name>.py`` imports, directly or
through others, at module level or inside functions (``ast``, nothing imported; tests/code/import_graph.py). Package
``__init__`` files holding only a docstring and constants are left out: they cannot change a result.
The params a stage reads are found the same way: attribute chains ``params.<section>.<key>`` (and aliases
``x = params.<section>`` then ``x.<key>``) in those modules; a section used whole (passed on) needs all its keys.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from typing import Any

import pytest
import yaml

from tests.code.import_graph import REPO_ROOT, edges_from, is_inert, module_file

DVC = yaml.safe_load((REPO_ROOT / "dvc.yaml").read_text())["stages"]
PARAMS = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())
STAGES = list(DVC)
CODE_ROOTS = ("emassist", "stages")

#: Keys that change how a stage works, not what it produces (``key`` for every stage, ``stage:key`` for one): a stage
#: need not declare them (DVC would rerun it for nothing).
NOT_RESULTS = {
    "data.raw_dir": "a location: dvc.yaml names the same path (test_locations_are_params_paths)",
    "data.interim_dir": "a location: dvc.yaml names the same path (test_locations_are_params_paths)",
    "data.splits_dir": "a location: dvc.yaml names the same path (test_locations_are_params_paths)",
    "data.augmented_dir": "a location: dvc.yaml names the same path (test_locations_are_params_paths)",
    "train:data.source": "a tag of the MLflow run",
    "ingest.workers": "parallel processes",
    "nffa.download_dir": "where the tars are cached",
    "nffa.retries": "network retries",
    "nffa.timeout_s": "network timeout",
    "s3.region": "which endpoint answers, not what it holds",
    "s3.profile": "whose credentials",
    "s3.workers": "parallel transfers",
    "s3.retries": "network retries",
    "s3.timeout_s": "network timeout",
    "s3.dvc_remote": "the DVC remote (emassist s3 dvc-remote), not the data",
    "s3.dvc_prefix": "the DVC remote (emassist s3 dvc-remote), not the data",
    "s3.dvc_jobs": "the DVC remote (emassist s3 dvc-remote), not the data",
    "s3.mlflow_prefix": "the MLflow server's artifact store (emassist s3 mlflow-server)",
    "mlflow.tracking_uri": "where runs are logged (MLFLOW_TRACKING_URI overrides it, which DVC cannot see)",
    "train.work_pool": "where training runs (Prefect), not what it computes",
}
#: ``params.<section>.<method>`` calls: the keys each reads.
METHODS = {
    ("mlflow", "resolved_tracking_uri"): ["mlflow.tracking_uri"],
    ("split", "ratios"): ["split.train", "split.val", "split.test"],
}
#: Data each stage reads (besides code): paths from params.yaml and the model files of emassist.model.files.
DATA = PARAMS["data"]
SOURCE_DATA = {PARAMS["monitoring"]["feedback_dir"]}  # data kept in the repository (DVC-tracked by class), not made
DATA_INPUTS: dict[str, list[str]] = {
    "acquire": [PARAMS["monitoring"]["feedback_dir"]],  # corrections merged into the raw data
    "ingest": [DATA["raw_dir"]],
    "validate": [DATA["interim_dir"]],
    "split": [DATA["interim_dir"], "reports/validation"],  # split only after the data passed validation
    "augment": [f"{DATA['splits_dir']}/train.csv", DATA["interim_dir"]],
    "train": [DATA["augmented_dir"], f"{DATA['splits_dir']}/val.csv", DATA["interim_dir"]],
    "evaluate": [
        "models/model.keras",
        "models/history.json",  # the curves in reports/plots/history.csv
        "models/run.json",  # the MLflow run the test metrics are logged into
        f"{DATA['splits_dir']}/train.csv",  # the familiarity score is fitted on the train split's features
        f"{DATA['splits_dir']}/val.csv",  # the temperature and both thresholds are fitted on val
        f"{DATA['splits_dir']}/test.csv",
        DATA["interim_dir"],  # the test images
    ],
    "register": [
        "models/model.keras",
        "models/run.json",
        "models/calibration.json",  # the temperature and review threshold shipped in the serving config
        "models/familiarity.npz",  # shipped as an artifact of the model
        "reports/metrics.json",
        f"{DATA['splits_dir']}/test.csv",  # the gate re-evaluates the champion on the same test split
        DATA["interim_dir"],
    ],
}


def _paths(entries: list[Any]) -> list[str]:
    """dvc.yaml list entries (``path`` or ``{path: {options}}``) as paths."""
    return [next(iter(e)) if isinstance(e, dict) else str(e) for e in entries or []]


def deps(stage: str) -> list[str]:
    return _paths(DVC[stage].get("deps", []))


def outs(stage: str) -> list[str]:
    return [p for key in ("outs", "metrics", "plots") for p in _paths(DVC[stage].get(key, []))]


def covered(path: str, by: list[str]) -> bool:
    return any(path == d or path.startswith(d.rstrip("/") + "/") for d in by)


def stage_code(stage: str) -> dict[str, list[str]]:
    """``{file: import chain}`` of every first-party file the stage's module runs (inert packages left out)."""
    start = f"stages.{stage}"
    chain = {start: [start]}
    todo = [start]
    while todo:
        module = todo.pop()
        for edge in edges_from(module):
            if edge.kind != "typing" and edge.target not in chain:
                chain[edge.target] = [*chain[module], f"{edge.target} ({edge.where()})"]
                todo.append(edge.target)
    files = {}
    for module, via in chain.items():
        path = module_file(module)
        if path is not None and not is_inert(module):
            files[path.as_posix()] = via
    return files


@pytest.mark.parametrize("stage", STAGES)
def test_stage_runs_its_thin_module(stage: str) -> None:
    assert DVC[stage]["cmd"] == f"python -m stages.{stage}"
    assert (REPO_ROOT / "stages" / f"{stage}.py").is_file()
    assert f"stages/{stage}.py" in deps(stage)


def test_every_pipeline_step_is_a_dvc_stage() -> None:
    tree = ast.parse((REPO_ROOT / "emassist" / "pipeline" / "steps.py").read_text())
    steps = next(
        node.value
        for node in tree.body
        if isinstance(node, ast.AnnAssign) and getattr(node.target, "id", "") == "STEPS"
    )
    assert isinstance(steps, ast.Dict)
    assert [k.value for k in steps.keys if isinstance(k, ast.Constant)] == STAGES


@pytest.mark.parametrize("stage", STAGES)
def test_code_deps_cover_every_module_the_stage_imports(stage: str) -> None:
    code = stage_code(stage)
    assert f"emassist/pipeline/{stage}.py" in code, (
        f"stages/{stage}.py does not run the library step: it should be `sys.exit(run_stage({stage!r}, __doc__ or "
        f"'', main))` with `from emassist.pipeline.{stage} import main`"
    )
    missing = {path: via for path, via in code.items() if not covered(path, deps(stage))}
    assert not missing, f"dvc.yaml stage {stage!r} lacks deps for code it runs:\n  " + "\n  ".join(
        f"{path}  (via {' -> '.join(via)})" for path, via in sorted(missing.items())
    )


@pytest.mark.parametrize("stage", STAGES)
def test_code_deps_name_only_code_the_stage_runs(stage: str) -> None:
    code = stage_code(stage)
    stale = [d for d in deps(stage) if d.startswith(CODE_ROOTS) and not any(covered(p, [d]) for p in code)]
    assert not stale, f"dvc.yaml stage {stage!r} declares code it does not run: {stale}"


@pytest.mark.parametrize("stage", STAGES)
def test_every_dep_exists_or_is_made_upstream(stage: str) -> None:
    upstream = [o for other in STAGES[: STAGES.index(stage)] for o in outs(other)]
    for dep in deps(stage):
        if dep.startswith(CODE_ROOTS):
            assert (REPO_ROOT / dep).exists(), f"{stage}: dep {dep} does not exist"
        elif dep in SOURCE_DATA:
            assert (REPO_ROOT / dep).is_dir(), f"{stage}: source folder {dep} is missing (a fresh clone needs it)"
        else:
            assert covered(dep, upstream), f"{stage}: dep {dep} is neither code nor the output of an earlier stage"


@pytest.mark.parametrize("stage", STAGES)
def test_data_inputs_are_declared(stage: str) -> None:
    data_deps = [d for d in deps(stage) if not d.startswith(CODE_ROOTS)]
    missing = [path for path in DATA_INPUTS[stage] if not covered(path, data_deps)]
    assert not missing, f"dvc.yaml stage {stage!r} reads {missing} without declaring them"
    extra = [d for d in data_deps if not any(covered(p, [d]) or covered(d, [p]) for p in DATA_INPUTS[stage])]
    assert not extra, f"dvc.yaml stage {stage!r} declares data it does not read: {extra}"


def test_locations_are_params_paths() -> None:
    """params.yaml's data folders are the paths dvc.yaml's outs name (so the location keys need no params entry)."""
    assert outs("acquire") == [DATA["raw_dir"]]
    assert outs("ingest") == [DATA["interim_dir"]]
    assert DATA["splits_dir"] in outs("split")
    assert outs("augment") == [DATA["augmented_dir"]]


def test_metrics_are_the_headline_figures_only() -> None:
    """`dvc metrics show` / `dvc exp show` open on accuracy, macro-F1, balanced accuracy, top-3, not split counts."""
    metrics = {stage: _paths(DVC[stage].get("metrics", [])) for stage in STAGES}
    assert {s: m for s, m in metrics.items() if m} == {"evaluate": ["reports/metrics.json"]}
    split_outs = {next(iter(e)) if isinstance(e, dict) else e: e for e in DVC["split"]["outs"]}
    assert split_outs["reports/split.json"] == {"reports/split.json": {"cache": False}}


# --------------------------------------------------------------------------------------------- params


def _chains(scope: ast.AST, root: str) -> Iterator[tuple[str, ...]]:
    """``root.a.b...`` chains (as ("a", "b", ...)) in a function; aliases ``x = root.a`` resolved; a bare ``root.a``
    or alias that goes on whole (an argument, say) is the chain ("a",)."""
    body = [n for n in ast.walk(scope) if n is not scope]
    aliases: dict[str, tuple[str, ...]] = {}
    alias_nodes: set[int] = set()
    for node in body:
        if (
            isinstance(node, ast.Assign)
            and len(node.targets) == 1
            and isinstance(node.targets[0], ast.Name)
            and isinstance(node.value, ast.Attribute)
            and isinstance(node.value.value, ast.Name)
            and node.value.value.id == root
        ):
            aliases[node.targets[0].id] = (node.value.attr,)
            alias_nodes.add(id(node.value))
    inner = {id(n.value) for n in body if isinstance(n, ast.Attribute)}
    for node in body:
        if isinstance(node, ast.Name) and node.id in aliases and id(node) not in inner:
            if isinstance(node.ctx, ast.Load):
                yield aliases[node.id]  # the alias goes on whole
            continue
        if not isinstance(node, ast.Attribute) or id(node) in inner or id(node) in alias_nodes:
            continue
        attrs: list[str] = []
        base: ast.expr = node
        while isinstance(base, ast.Attribute):
            attrs.insert(0, base.attr)
            base = base.value
        if isinstance(base, ast.Name) and base.id == root:
            yield tuple(attrs)
        elif isinstance(base, ast.Name) and base.id in aliases:
            yield (*aliases[base.id], *attrs)


def _keys_read(chain: tuple[str, ...]) -> list[str]:
    section = chain[0]
    if section not in PARAMS or not isinstance(PARAMS[section], dict):
        return []  # a method of Params (params.check())
    if len(chain) == 1:
        return [f"{section}.{key}" for key in PARAMS[section]]  # the whole section goes on
    if chain[1] in PARAMS[section]:
        return [f"{section}.{chain[1]}"]
    if (section, chain[1]) in METHODS:
        return METHODS[(section, chain[1])]
    raise AssertionError(f"params.{'.'.join(chain)}: neither a key of params.yaml nor a known method (METHODS)")


Function = ast.FunctionDef | ast.AsyncFunctionDef


def _tree(module: str) -> ast.Module | None:
    path = module_file(module)
    return ast.parse((REPO_ROOT / path).read_text()) if path else None


def _imported_names(tree: ast.Module, module: str) -> dict[str, str]:
    """``{local name: dotted origin}`` of every ``from X import y`` in a module (any scope)."""
    names = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and not node.level:
            for alias in node.names:
                names[alias.asname or alias.name] = f"{node.module}.{alias.name}"
    return names


def _find_function(dotted: str, depth: int = 0) -> tuple[str, Function] | None:
    """The definition of ``module.func`` or ``module.Class.method`` (following one re-export), or None."""
    parts = dotted.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        module, rest = ".".join(parts[:cut]), parts[cut:]
        tree = _tree(module)
        if tree is None:
            continue
        scope: ast.AST = tree
        for name in rest:
            found = next((n for n in ast.iter_child_nodes(scope) if getattr(n, "name", None) == name), None)
            if found is None:
                origin = _imported_names(tree, module).get(name) if scope is tree else None
                return _find_function(".".join([origin, *rest[1:]]), depth + 1) if origin and depth < 3 else None
            scope = found
        return (module, scope) if isinstance(scope, Function) else None
    return None


def _param_name(func: Function, call: ast.Call, root: str) -> str | None:
    """The name under which ``func`` receives the ``root`` argument of ``call``."""
    args = [a.arg for a in (*func.args.posonlyargs, *func.args.args)]
    if args and args[0] in ("self", "cls"):
        args = args[1:]
    for i, arg in enumerate(call.args):
        if isinstance(arg, ast.Name) and arg.id == root and i < len(args):
            return args[i]
    for kw in call.keywords:
        if isinstance(kw.value, ast.Name) and kw.value.id == root and kw.arg:
            return kw.arg
    return None


def params_read(stage: str) -> dict[str, set[str]]:
    """``{key: functions}``: the params keys read by the stage's step and every function it hands ``params`` on to
    (followed through calls that pass the Params object, across modules)."""
    found: dict[str, set[str]] = {}
    start = _find_function(f"emassist.pipeline.{stage}.main")
    assert start is not None, f"emassist/pipeline/{stage}.py has no main(params)"
    todo = [(start[0], start[1], start[1].args.args[0].arg)]
    seen: set[tuple[str, str, str]] = set()
    while todo:
        module, func, root = todo.pop()
        if (module, func.name, root) in seen:
            continue
        seen.add((module, func.name, root))
        for chain in _chains(func, root):
            for key in _keys_read(chain):
                found.setdefault(key, set()).add(f"{module}.{func.name}")
        tree = _tree(module)
        assert tree is not None
        names = _imported_names(tree, module)
        for call in (n for n in ast.walk(func) if isinstance(n, ast.Call)):
            target = call.func
            if isinstance(target, ast.Name):
                dotted = names.get(target.id, f"{module}.{target.id}")
            elif isinstance(target, ast.Attribute) and isinstance(target.value, ast.Name):
                owner = target.value.id
                dotted = f"{names.get(owner, f'{module}.{owner}')}.{target.attr}"
            else:
                continue
            callee = _find_function(dotted)
            if callee is not None and (name := _param_name(callee[1], call, root)):
                todo.append((callee[0], callee[1], name))
    return found


def declared_params(stage: str) -> list[str]:
    entries = DVC[stage].get("params", [])
    assert all(isinstance(e, str) for e in entries), f"{stage}: params from another file are not expected"
    return entries


@pytest.mark.parametrize("stage", STAGES)
def test_declared_params_exist(stage: str) -> None:
    for entry in declared_params(stage):
        node: Any = PARAMS
        for part in entry.split("."):
            assert isinstance(node, dict) and part in node, f"{stage}: params entry {entry!r} is not in params.yaml"
            node = node[part]


@pytest.mark.parametrize("stage", STAGES)
def test_declared_params_cover_what_the_stage_reads(stage: str) -> None:
    declared = declared_params(stage)
    read = params_read(stage)
    assert read, f"{stage}: no params read found (the reader is broken)"
    exempt = {k.split(":")[-1] for k in NOT_RESULTS if ":" not in k or k.startswith(f"{stage}:")}
    missing = {key: files for key, files in read.items() if key not in exempt and not covered_key(key, declared)}
    assert not missing, f"dvc.yaml stage {stage!r} reads params it does not declare:\n  " + "\n  ".join(
        f"{key}  (in {', '.join(sorted(files))})" for key, files in sorted(missing.items())
    )
    unread = [e for e in declared if not any(covered_key(key, [e]) for key in read)]
    assert not unread, f"dvc.yaml stage {stage!r} declares params its code never reads: {unread}"


def covered_key(key: str, declared: list[str]) -> bool:
    return any(key == d or key.startswith(d + ".") for d in declared)


def test_params_reader_sees_chains_aliases_and_whole_sections() -> None:
    tree = ast.parse(
        "def f(params):\n"
        "    i = params.ingest\n"
        "    n = params.nffa\n"
        "    g(i.cache_size, params.data.classes, params.mlflow.resolved_tracking_uri(), params.s3, n)\n"
        "    params.check()\n"
    )
    func = tree.body[0]
    keys = sorted({k for chain in _chains(func, "params") for k in _keys_read(chain)})
    assert "ingest.cache_size" in keys and "data.classes" in keys and "mlflow.tracking_uri" in keys
    assert {f"s3.{k}" for k in PARAMS["s3"]} <= set(keys) and {f"nffa.{k}" for k in PARAMS["nffa"]} <= set(keys)
    assert "ingest.workers" not in keys and not any(k.startswith("check") for k in keys)
    with pytest.raises(AssertionError, match=r"params\.train\.nope"):
        _keys_read(("train", "nope"))


def test_params_reader_follows_params_into_the_library() -> None:
    """The train step hands params to emassist.model.training.train: keys read there count for the stage."""
    read = params_read("train")
    assert "train.epochs" in read or "train.model" in read, sorted(read)
    assert any(not f.startswith("emassist.pipeline.") for files in read.values() for f in files), read
