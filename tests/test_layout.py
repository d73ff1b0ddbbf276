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
import pathlib
import subprocess
import sys

import pytest

import pcgrad_optax

PACKAGE = pathlib.Path(pcgrad_optax.__file__).parent

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
        "task_params", "track_conflicts", "value_and_grad", "with_branches"],
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
