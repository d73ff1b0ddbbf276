"""The package's layout: public names, one method per module, no import cycles.

Public names are a contract with users: every name below was exported before
the package moved to one method per module, and must stay importable where it
was. Each method's module (``pcgrad_optax/aggregation/_<method>.py`` or
``pcgrad_optax/scalarization/_<method>.py``) defines both its weighting and its
transformation; ``pcgrad_optax.weighting`` and the package ``__init__`` files
only re-export; the modules import each other without a cycle.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import json
import pathlib
import re
import shutil
import subprocess
import sys
import zipfile

import pytest

import pcgrad_optax

PACKAGE = pathlib.Path(pcgrad_optax.__file__).parent

# Issue 13, loss level: the new methods and every loss-level method's
# one-backward-pass form.
LOSS_LEVEL = {
    "pcgrad_optax.scalarization": [
        "IMTLLState", "LossScalarization", "STCHState", "cosmos",
        "cosmos_loss", "dwa_loss", "famo_loss", "geometric_mean",
        "geometric_mean_loss", "imtl_l", "imtl_l_loss", "pbi", "pbi_loss",
        "rlw_loss", "stch", "stch_loss", "uncertainty_loss"],
    "pcgrad_optax.weighting": [
        "cosmos", "geometric_mean", "imtl_l", "pbi", "stch"],
}

PUBLIC = {
    "pcgrad_optax": [
        "DWAState", "FAMOState", "GradDropState", "GradVacState",
        "MultiStepsState", "PCGradState", "RLWState", "UncertaintyState",
        "aligned_mtl", "cagrad", "config", "diagnostics", "dualproj", "dwa",
        "famo", "graddrop", "gradvac", "gram_matrix", "imtl_g", "mean",
        "memory", "mgda", "multi_steps", "nash_mtl", "pcgrad", "recon", "rlw",
        "sharding", "sum", "task_value_and_grad", "uncertainty", "upgrad",
        "weighted_sum", "weighting",
        # Issue 13.
        "CRMOGMState", "constant", "cr_mogm", "fairgrad", "krum",
        "trimmed_mean",
        # Issue 15.
        "value_and_aggregate"],
    "pcgrad_optax.weighting": [
        "aligned_mtl", "cagrad", "check_gram", "config", "dualproj", "dwa",
        "famo", "gradvac", "imtl_g", "mean", "mgda", "nash_mtl", "pcgrad",
        "random_orders", "rlw", "sum", "uncertainty", "upgrad",
        # Issue 13.
        "constant", "cr_mogm", "fairgrad", "krum"],
    "pcgrad_optax.recon": [
        "ConflictState", "branch", "layer_grams", "layer_names",
        "pairwise_cosines", "select_layers", "shared_mask", "task_losses",
        "task_params", "track_conflicts", "value_and_grad", "with_branches",
        # Issue 14: BatchNorm state of branched layers.
        "branch_state", "merge_task_states", "task_state"],
    "pcgrad_optax.memory": ["streaming_aggregate", "task_value_and_grad"],
    "pcgrad_optax.sharding": [
        "aggregate", "gram_matrix", "stacked_sharding", "task_value_and_grad"],
    "pcgrad_optax.diagnostics": [
        "conflict_fraction", "cosine_similarities", "magnitude_similarity",
        "summary", "task_norms"],
    "pcgrad_optax.datasets": ["MultiDigits", "multi_digits"],
    "pcgrad_optax.toy": [
        "LOWER", "MEAN_LOSS_ARGMIN", "MEAN_LOSS_MIN", "PCGRAD_PAPER_START",
        "STARTS", "losses", "pcgrad_paper_losses"],
}

PUBLIC["pcgrad_optax.scalarization"] = LOSS_LEVEL["pcgrad_optax.scalarization"]
PUBLIC["pcgrad_optax"] = PUBLIC["pcgrad_optax"] + LOSS_LEVEL[
    "pcgrad_optax.scalarization"]
PUBLIC["pcgrad_optax.weighting"] = PUBLIC["pcgrad_optax.weighting"] + \
    LOSS_LEVEL["pcgrad_optax.weighting"]

# Weightings without a transformation of the same name, or the other way.
WEIGHTING_ONLY = {"check_gram", "random_orders"}


@pytest.mark.parametrize("module", sorted(PUBLIC))
def test_public_names_kept(module):
  mod = importlib.import_module(module)
  missing = [n for n in PUBLIC[module] if not hasattr(mod, n)]
  assert not missing, f"{module} lost {missing}"
  exported = getattr(mod, "__all__", None)
  if exported is not None and module != "pcgrad_optax.toy":
    assert set(PUBLIC[module]) <= set(exported)


def test_demo_module_runs_as_main():
  spec = importlib.util.find_spec("pcgrad_optax.demo")
  assert spec is not None and spec.origin.endswith("demo.py")
  assert callable(importlib.import_module("pcgrad_optax.demo").main)


@pytest.mark.parametrize("name", sorted(
    set(PUBLIC["pcgrad_optax.weighting"]) - WEIGHTING_ONLY))
def test_weighting_and_transformation_share_a_module(name):
  weighting = getattr(pcgrad_optax.weighting, name)
  transform = getattr(pcgrad_optax, name)
  assert weighting.__module__ == transform.__module__
  family, method = transform.__module__.split(".")[1:]
  assert family in ("aggregation", "scalarization")
  assert method == f"_{name}"
  assert getattr(getattr(pcgrad_optax, family), name) is transform


def _module_names():
  for path in sorted(PACKAGE.rglob("*.py")):
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    if parts[-1] == "__init__":
      parts = parts[:-1]
    yield ".".join(parts), path


def _internal_imports(path):
  """The pcgrad_optax modules a file imports at its top level."""
  tree = ast.parse(path.read_text())
  modules = {name for name, _ in _module_names()}
  for node in tree.body:
    if isinstance(node, ast.ImportFrom) and (node.module or "").startswith(
        "pcgrad_optax"):
      for alias in node.names:
        full = f"{node.module}.{alias.name}"
        yield full if full in modules else node.module
    elif isinstance(node, ast.Import):
      for alias in node.names:
        if alias.name.startswith("pcgrad_optax"):
          yield alias.name


def test_no_import_cycles():
  graph = {name: set(_internal_imports(path)) - {name}
           for name, path in _module_names()}
  state = {}

  def visit(node, trail):
    state[node] = "open"
    for dep in sorted(graph.get(node, ())):
      if state.get(dep) == "open":
        cycle = trail[trail.index(dep):] + [dep]
        pytest.fail("import cycle: " + " -> ".join(cycle))
      if dep not in state:
        visit(dep, trail + [dep])
    state[node] = "done"

  for node in sorted(graph):
    if node not in state:
      visit(node, [node])


@pytest.mark.parametrize("relative", [
    "weighting.py", "__init__.py", "_core/__init__.py",
    "aggregation/__init__.py", "scalarization/__init__.py",
    "recon/__init__.py"])
def test_namespaces_hold_no_code(relative):
  tree = ast.parse((PACKAGE / relative).read_text())
  code = [type(n).__name__ for n in tree.body
          if isinstance(n, (ast.FunctionDef, ast.ClassDef, ast.If, ast.For,
                            ast.While, ast.With, ast.Try))]
  assert not code, f"{relative} defines {code}; it should only re-export"


def test_imports_without_docstrings():
  # python -OO strips docstrings; the factories fill theirs in at import.
  subprocess.run([sys.executable, "-OO", "-c", "import pcgrad_optax"],
                 check=True, timeout=120)


# --- Packaging: py.typed, the license, tested lower bounds, notebooks ---

ROOT = PACKAGE.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
# The oldest versions: pyproject's lower bounds and CONTRIBUTING.md's record
# of the test-suite run on them must name the same versions.
_BOUND = re.compile(r"^([A-Za-z0-9_.-]+)>=([0-9][0-9.]*)$")
_RECORDED = re.compile(
    r"^\|\s*`?([A-Za-z0-9_.-]+)`?\s*\|\s*([0-9][0-9.]*)\s*\|", re.M)


def _pyproject():
  import tomllib  # pylint: disable=g-import-not-at-top
  return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _lower_bounds():
  bounds = {}
  for requirement in _pyproject()["project"]["dependencies"]:
    match = _BOUND.match(requirement.replace(" ", ""))
    assert match, f"dependency {requirement!r} has no plain >= lower bound"
    bounds[match.group(1).lower()] = match.group(2)
  return bounds


def test_ships_py_typed_and_the_apache_license():
  assert (PACKAGE / "py.typed").is_file()
  config = _pyproject()
  assert config["project"]["license"] == "Apache-2.0"
  assert config["project"]["license-files"] == ["LICENSE"]
  package_data = config["tool"]["setuptools"]["package-data"]
  assert "py.typed" in package_data["pcgrad_optax"]
  text = (ROOT / "LICENSE").read_text()
  for part in ("Apache License", "Version 2.0, January 2004",
               "TERMS AND CONDITIONS FOR USE, REPRODUCTION, AND DISTRIBUTION",
               "9. Accepting Warranty or Additional Liability.",
               "END OF TERMS AND CONDITIONS"):
    assert part in text
  assert len(text.splitlines()) >= 200      # the whole text, not a header


def test_wheel_holds_py_typed_license_and_bounds(tmp_path):
  from importlib import metadata  # pylint: disable=g-import-not-at-top
  major, minor = (int(x) for x in metadata.version("setuptools").split(".")[:2])
  if (major, minor) < (77, 0):
    pytest.skip("building the wheel needs setuptools>=77 (the test extra)")
  src = tmp_path / "src"
  src.mkdir()
  for name in ("pyproject.toml", "README.md", "LICENSE"):
    shutil.copy(ROOT / name, src / name)
  shutil.copytree(PACKAGE, src / "pcgrad_optax",
                  ignore=shutil.ignore_patterns("__pycache__"))
  out = subprocess.run(
      [sys.executable, "-c", "import sys, setuptools.build_meta as b; "
       "print(b.build_wheel(sys.argv[1]))", str(tmp_path / "dist")],
      cwd=src, check=True, capture_output=True, text=True, timeout=300)
  wheel = tmp_path / "dist" / out.stdout.strip().splitlines()[-1]
  with zipfile.ZipFile(wheel) as z:
    names = z.namelist()
    meta = z.read(next(n for n in names if n.endswith(".dist-info/METADATA")))
  assert "pcgrad_optax/py.typed" in names
  assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
  meta = meta.decode()
  assert "License-Expression: Apache-2.0" in meta
  for name, version in _lower_bounds().items():
    assert re.search(rf"^Requires-Dist: {re.escape(name)}>={version}$", meta,
                     re.M | re.I), (name, version)


def test_lower_bounds_are_the_versions_the_suite_ran_on():
  from importlib import metadata  # pylint: disable=g-import-not-at-top
  bounds = _lower_bounds()
  text = (ROOT / "CONTRIBUTING.md").read_text()
  section = text.split("## Oldest supported versions", 1)[1].split("\n## ")[0]
  recorded = {k.lower(): v for k, v in _RECORDED.findall(section)}
  python = recorded.pop("python")
  assert bounds == recorded, "pyproject's lower bounds != the tested ones"
  assert _pyproject()["project"]["requires-python"] == ">=" + python
  for name, version in bounds.items():         # this environment meets them
    installed = tuple(int(x) for x in re.findall(r"\d+", metadata.version(
        name))[:3])
    assert installed >= tuple(int(x) for x in version.split(".")), name


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_committed_with_its_outputs(path):
  # GitHub and Colab show the committed outputs; the test suite still runs
  # every notebook (--nbmake). Outputs: every code cell run once, in order,
  # no errors, at least one plot, no local paths, under 1 MB.
  notebook = json.loads(path.read_text())
  code = [c for c in notebook["cells"] if c["cell_type"] == "code"]
  assert [c["execution_count"] for c in code] == list(
      range(1, len(code) + 1)), "not executed top to bottom"
  outputs = [o for c in code for o in c["outputs"]]
  assert not [o for o in outputs if o["output_type"] == "error"]
  assert [o for o in outputs if "image/png" in o.get("data", {})]
  text = path.read_text()
  for local in ("/work/", "/home/", "/tmp/", "/root/", "site-packages"):
    assert local not in text, f"{path.name} shows a local path ({local})"
  assert path.stat().st_size < 1_000_000
