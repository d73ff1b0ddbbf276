"""Checkpoints: every state through orbax, flax.serialization and pickle.

For every transformation of tests/checkpoint_cases.py (each factory of
``aggregation.__all__`` and ``scalarization.__all__`` chained with Adam,
``multi_steps``, ``apply_if_finite``): the state after two training steps
round-trips through ``flax.serialization`` (``to_bytes``/``from_bytes`` and
``to_state_dict``/``from_state_dict``), ``pickle`` and orbax-checkpoint's
``StandardCheckpointer``, leaf for leaf (values, dtypes, structure), and
training resumed from each restored state *in a fresh process* (one
subprocess for all of them) is bit-identical to the uninterrupted run.

PRNG keys are kept in the states as raw uint32 key data: the draws are those
of the typed key the factory was given (its implementation included), so
PCGrad's random orders for a seed are unchanged. The README's
"Checkpointing" snippets run as written.
"""

from __future__ import annotations

import json
import os
import pathlib
import pickle
import re
import subprocess
import sys

import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from jax.experimental.compilation_cache import (
    compilation_cache as jax_compilation_cache)

import checkpoint_cases as cc
import pcgrad_optax as po

ROOT = pathlib.Path(__file__).resolve().parents[1]
CASE_NAMES = sorted(cc.CASES)


def assert_trees_identical(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    x, y = np.asarray(x), np.asarray(y)
    assert x.dtype == y.dtype and x.shape == y.shape
    np.testing.assert_array_equal(x, y)


def test_cases_cover_every_transformation():
  factories = {n for n in po.aggregation.__all__ + po.scalarization.__all__
               if n[0].islower()}
  assert factories <= set(cc.CASES)
  assert {"multi_steps", "apply_if_finite", "apply_if_finite_drop"} <= set(
      cc.CASES)


@pytest.fixture(scope="module")
def compilation_cache(tmp_path_factory):
  """A persistent compilation cache for this module's programs.

  The fresh process of the resume test is given it too: it loads the
  training steps' executables compiled here instead of compiling them all
  again (a fresh process all the same: nothing else is shared). The
  previous settings are restored afterwards.
  """
  path = str(tmp_path_factory.mktemp("jax_compilation_cache"))
  options = {"jax_compilation_cache_dir": path,
             "jax_persistent_cache_min_compile_time_secs": 0.0}
  previous = {name: getattr(jax.config, name) for name in options}
  jax_compilation_cache.reset_cache()
  for name, value in options.items():
    jax.config.update(name, value)
  yield path
  for name, value in previous.items():
    jax.config.update(name, value)
  jax_compilation_cache.reset_cache()


@pytest.fixture(scope="module")
def runs(compilation_cache):
  """name -> (tx, step, params and state after SAVE_AT steps, final pair)."""
  del compilation_cache   # only its setting: the steps compile into it
  out = {}
  for name in CASE_NAMES:
    tx = cc.CASES[name]()
    step = cc.step_fn(tx)
    params = cc.init_params()
    params, state = cc.train(tx, params, tx.init(params), 0, cc.SAVE_AT, step)
    final = cc.train(tx, params, state, cc.SAVE_AT, cc.STEPS, step)
    out[name] = (tx, step, (params, state), final)
  return out


def _orbax_round_trip(tree, target, path):
  ckptr = ocp.StandardCheckpointer()
  ckptr.save(path, tree)
  ckptr.wait_until_finished()
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
  return ckptr.restore(path, abstract)


@pytest.mark.parametrize("name", CASE_NAMES)
def test_state_round_trips_and_resumes(runs, name, tmp_path):
  tx, step, saved, final = runs[name]
  params, state = saved
  target = (params, tx.init(params))
  restored = {
      "flax_bytes": flax.serialization.from_bytes(
          target, flax.serialization.to_bytes(saved)),
      "flax_state_dict": flax.serialization.from_state_dict(
          target, flax.serialization.to_state_dict(saved)),
      "pickle": pickle.loads(pickle.dumps(saved)),
      "orbax": _orbax_round_trip(saved, target, tmp_path / "ckpt"),
  }
  for how, pair in restored.items():
    assert_trees_identical(pair, saved)
    # the NamedTuple states come back as themselves, not as dicts
    assert jax.tree.structure(pair[1]) == jax.tree.structure(state), how
    resumed = cc.train(tx, *pair, cc.SAVE_AT, cc.STEPS, step)
    assert_trees_identical(resumed, final)


RESUME_SCRIPT = """
import json, pickle, sys
import flax.serialization, jax, numpy as np
import orbax.checkpoint as ocp
import checkpoint_cases as cc

root = sys.argv[1]
report = {}
for name in sorted(cc.CASES):
  tx = cc.CASES[name]()
  step = cc.step_fn(tx)
  params = cc.init_params()
  target = (params, tx.init(params))
  with open(f"{root}/{name}.expected.msgpack", "rb") as f:
    expected = flax.serialization.from_bytes(target, f.read())
  restored = {}
  with open(f"{root}/{name}.msgpack", "rb") as f:
    restored["flax_bytes"] = flax.serialization.from_bytes(target, f.read())
  with open(f"{root}/{name}.pkl", "rb") as f:
    restored["pickle"] = pickle.load(f)
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
  restored["orbax"] = ocp.StandardCheckpointer().restore(
      f"{root}/{name}.orbax", abstract)
  report[name] = {}
  for how, pair in restored.items():
    resumed = cc.train(tx, *pair, cc.SAVE_AT, cc.STEPS, step)
    same = jax.tree.structure(resumed) == jax.tree.structure(expected) and all(
        a.dtype == b.dtype and np.array_equal(a, b, equal_nan=True)
        for a, b in zip(map(np.asarray, jax.tree.leaves(resumed)),
                        map(np.asarray, jax.tree.leaves(expected))))
    report[name][how] = same
print(json.dumps(report))
"""


def test_resume_in_a_fresh_process_is_bit_identical(runs, compilation_cache,
                                                    tmp_path):
  ckptr = ocp.StandardCheckpointer()
  for name, (_, _, saved, final) in runs.items():
    (tmp_path / f"{name}.msgpack").write_bytes(
        flax.serialization.to_bytes(saved))
    (tmp_path / f"{name}.expected.msgpack").write_bytes(
        flax.serialization.to_bytes(final))
    with open(tmp_path / f"{name}.pkl", "wb") as f:
      pickle.dump(saved, f)
    ckptr.save(tmp_path / f"{name}.orbax", saved)
  ckptr.wait_until_finished()
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(
      [str(ROOT), str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")]),
             JAX_COMPILATION_CACHE_DIR=compilation_cache,
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
  result = subprocess.run(
      [sys.executable, "-c", RESUME_SCRIPT, str(tmp_path)], env=env,
      capture_output=True, text=True, timeout=900, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  report = json.loads(result.stdout.strip().splitlines()[-1])
  assert sorted(report) == CASE_NAMES
  failed = {name: [how for how, same in r.items() if not same]
            for name, r in report.items() if not all(r.values())}
  assert not failed, failed
  assert all(len(r) == 3 for r in report.values())


def test_apply_if_finite_case_skips_the_nan_step(runs):
  # The NaN batch of checkpoint_cases really reaches the wrapper.
  for name in ("apply_if_finite", "apply_if_finite_drop"):
    _, _, _, (_, state) = runs[name]
    assert not bool(state.last_finite)
  assert int(runs["apply_if_finite"][3][1].total_notfinite) == 1
  assert np.asarray(runs["apply_if_finite_drop"][3][1].tasks.dropped_count
                    ).tolist() == [0, 1, 0]


@pytest.mark.parametrize("name", ["pcgrad", "gradvac", "graddrop", "rlw"])
def test_keys_are_raw_data_and_draw_as_the_typed_key(name):
  params = {"w": jnp.zeros(3)}
  g = {"w": jnp.asarray(np.random.default_rng(0).standard_normal((3, 3)),
                        jnp.float32)}
  kwargs = {"num_tasks": 3} if name == "gradvac" else {}
  factory = getattr(po, name)
  for key in (5, jax.random.key(5), jax.random.PRNGKey(5),
              jax.random.key(5, impl="rbg")):
    tx = factory(key, **kwargs)
    state = tx.init(params)
    assert state.key.dtype == jnp.uint32
    typed = key if isinstance(key, jax.Array) and jnp.issubdtype(
        key.dtype, jax.dtypes.prng_key) else jax.random.key(5)
    np.testing.assert_array_equal(state.key, jax.random.key_data(typed))
    # the state made with the typed key itself draws the same numbers
    typed_state = state._replace(key=typed)
    for _ in range(2):
      out, new_state = tx.update(g, state, params)
      ref, typed_state = tx.update(g, typed_state, params)
      np.testing.assert_array_equal(out["w"], ref["w"])
      state = new_state


def test_pcgrad_orders_for_a_seed_unchanged():
  # Step n's orders are random_orders(fold_in(jax.random.key(seed), n), T),
  # as before the keys were stored as raw data.
  params = {"w": jnp.zeros(3)}
  g = jnp.asarray(np.random.default_rng(1).standard_normal((3, 3)),
                  jnp.float32)
  tx = po.pcgrad(11)
  state = tx.init(params)
  for n in range(3):
    out, state = tx.update({"w": g}, state, params)
    w = po.weighting.pcgrad(
        g @ g.T, key=jax.random.fold_in(jax.random.key(11), n))
    np.testing.assert_allclose(out["w"], w @ g, rtol=1e-6, atol=1e-6)


def readme_section(title):
  text = (ROOT / "README.md").read_text()
  section = text.split(f"## {title}\n", 1)[1].split("\n## ", 1)[0]
  return re.findall(r"```python\n(.*?)```", section, re.S)


def test_readme_checkpointing_snippets_run(tmp_path, monkeypatch):
  blocks = readme_section("Checkpointing")
  assert len(blocks) == 3
  monkeypatch.chdir(tmp_path)
  namespace = {}
  for block in blocks:
    exec(compile(block, "README.md", "exec"), namespace)  # noqa: S102
  assert namespace["mngr"].latest_step() == 2
  assert_trees_identical(namespace["restored"]["opt_state"],
                         namespace["state"])
  assert_trees_identical(namespace["from_bytes"], namespace["state"])
  assert_trees_identical(namespace["unpickled"], namespace["state"])
