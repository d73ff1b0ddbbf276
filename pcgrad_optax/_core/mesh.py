"""How the core sees arrays on a device mesh.

Under explicit mesh axes a contraction over a sharded axis must name its
output sharding: :func:`explicit_spec` tells whether a leaf is sharded so,
and :func:`on_mesh_of` names the output's sharding on the leaf's own mesh,
which works with or without ``jax.set_mesh``. Inside ``jax.shard_map``
values fed to a loop carry or a VJP must vary over the same manual axes as
the values they meet (:func:`vary_like`).
"""

from __future__ import annotations

import jax
from jax.sharding import NamedSharding, PartitionSpec


def explicit_spec(x) -> tuple | None:
  """x's PartitionSpec if an explicit mesh axis shards it, else None."""
  spec = tuple(getattr(jax.typeof(x).sharding, "spec", ()))
  return spec if any(s is not None for s in spec) else None


def on_mesh_of(x, *spec) -> NamedSharding:
  """``NamedSharding(x's mesh, P(*spec))``, for an ``out_sharding``.

  The mesh is the abstract one in x's type, so this works inside ``jit``
  on explicit-axis arrays whether or not ``jax.set_mesh`` is active (a bare
  ``PartitionSpec`` needs a mesh context). Call it only when
  :func:`explicit_spec` says x is sharded.
  """
  return NamedSharding(jax.typeof(x).sharding.mesh, PartitionSpec(*spec))


def vary_like(x: jax.Array, ref: jax.Array) -> jax.Array:
  """Marks x as varying over the shard_map axes that ref varies over.

  Inside ``jax.shard_map`` the cotangents fed to a VJP must vary over the
  same manual mesh axes as the outputs they pull back (e.g. per-device
  losses of a data-parallel axis); a no-op elsewhere.
  """
  axis_type = getattr(jax.typeof(ref), "manual_axis_type", None)
  varying = tuple(sorted(axis_type.varying)) if axis_type is not None else ()
  return jax.lax.pcast(x, varying, to="varying") if varying else x
