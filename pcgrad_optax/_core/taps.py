"""Where the params enter a loss function, and its cotangents there.

The per-layer Gram engine of :func:`pcgrad_optax.value_and_aggregate` works
on the jaxpr of the loss. :func:`find_dense_uses` finds the param leaves that
enter it exactly once, as one operand of a ``dot_general`` (Dense, Einsum,
attention projections), possibly through layout-only ops (a dtype cast, a
transpose, a reshape); ``jit`` calls are looked into. :func:`tapped_fn`
re-evaluates the jaxpr with a zero "tap" added to the output of each such
``dot_general``: the cotangent of a tap is the cotangent ``D`` of that
layer's output, and the other operand ``X`` comes back as an auxiliary
output. :func:`dense_gram` and :func:`dense_update` turn ``(X, D_t)`` into
the leaf's ``(T, T)`` Gram block and its weighted gradient without forming a
per-task weight gradient (when that is the cheaper way).
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.extend import core as jcore

from pcgrad_optax._core import cpu
from pcgrad_optax._core.gram import dot_cross
from pcgrad_optax._core.mesh import explicit_spec, on_mesh_of
from pcgrad_optax._core.stacked import accumulation_dtype

# Ops between a param and its dot_general that only change its layout or
# dtype: the leaf's gradient is the (linear) transpose of the chain applied
# to the operand's gradient, with the same Gram matrix.
_LAYOUT_OPS = frozenset({"convert_element_type", "transpose", "reshape",
                         "copy", "copy_p"})
_CALL_OPS = frozenset({"jit", "pjit"})


class DenseUse(NamedTuple):
  """The one use of a param leaf: operand ``side`` of a ``dot_general``.

  Attributes:
    key: path of eqn indices to the ``dot_general`` (through ``jit`` calls).
    side: 0 if the param (after ``chain``) is the lhs, 1 if the rhs.
    eqn: the ``dot_general`` equation.
    chain: the layout-only equations from the param to the operand.
  """
  key: tuple[int, ...]
  side: int
  eqn: Any
  chain: tuple[Any, ...]


def _inner(eqn):
  closed = eqn.params["jaxpr"]
  return closed.jaxpr, closed.consts


def find_dense_uses(jaxpr, num_params: int) -> list[DenseUse | None]:
  """For each of the first ``num_params`` invars, its dense use or None.

  None (fall back to the leaf's per-task gradient) unless the leaf has
  exactly one use in the whole program and it is one operand of a
  ``dot_general`` whose other operand does not depend on that leaf
  directly.
  """
  uses: list[list] = [[] for _ in range(num_params)]

  def scan(jx, env, path):
    for i, eqn in enumerate(jx.eqns):
      found = [(k, env[v]) for k, v in enumerate(eqn.invars)
               if not isinstance(v, jcore.Literal) and v in env]
      if not found:
        continue
      name = eqn.primitive.name
      key = path + (i,)
      if name in _CALL_OPS and "jaxpr" in eqn.params:
        inner, _ = _inner(eqn)
        scan(inner, {inner.invars[k]: lc for k, lc in found}, key)
      elif (name in _LAYOUT_OPS and len(eqn.invars) == 1
            and len(eqn.outvars) == 1):
        leaf, chain = found[0][1]
        env[eqn.outvars[0]] = (leaf, chain + (eqn,))
      elif name == "dot_general" and len(found) == 1:
        k, (leaf, chain) = found[0]
        uses[leaf].append(DenseUse(key, k, eqn, chain))
      else:
        for _, (leaf, _) in found:
          uses[leaf].append(None)
    for v in jx.outvars:   # a param (or its view) leaving a call or the loss
      if not isinstance(v, jcore.Literal) and v in env:
        uses[env[v][0]].append(None)

  scan(jaxpr, {v: (n, ()) for n, v in enumerate(jaxpr.invars[:num_params])},
       ())
  return [u[0] if len(u) == 1 else None for u in uses]


def tapped_fn(closed_jaxpr, num_params: int, dense: list[DenseUse | None],
              param_leaves: list):
  """The loss as a function of the fallback leaves and the taps.

  Returns ``f(fallback_leaves, taps) -> (outputs, xs)``: ``outputs`` the
  loss's flat outputs, ``xs`` the non-param operand of every tapped
  ``dot_general`` (in the order of ``dense``, None for fallback leaves);
  the dense leaves are closed over (not differentiated) with the values in
  ``param_leaves``. ``taps[n]`` is added to the output of leaf ``n``'s
  ``dot_general``.
  """
  tapped = {u.key: n for n, u in enumerate(dense) if u is not None}
  inline = {u.key[:d] for u in dense if u is not None
            for d in range(1, len(u.key))}
  fallback = [n for n, u in enumerate(dense) if u is None]

  def f(fallback_leaves, taps):
    leaves = list(param_leaves)
    for n, v in zip(fallback, fallback_leaves):
      leaves[n] = v
    xs: list = [None] * num_params

    def run(jx, consts, args, path):
      env = {}

      def read(v):
        return v.val if isinstance(v, jcore.Literal) else env[v]

      for v, x in zip(jx.constvars, consts):
        env[v] = x
      for v, x in zip(jx.invars, args):
        env[v] = x
      for i, eqn in enumerate(jx.eqns):
        key = path + (i,)
        invals = [read(v) for v in eqn.invars]
        if key in inline:
          inner, inner_consts = _inner(eqn)
          outs = run(inner, inner_consts, invals, key)
        else:
          with eqn.ctx.manager:
            outs = eqn.primitive.bind(
                *invals, **eqn.primitive.get_bind_params(eqn.params))
          if not eqn.primitive.multiple_results:
            outs = [outs]
          if key in tapped:
            n = tapped[key]
            xs[n] = invals[1 - dense[n].side]
            outs = [outs[0] + taps[n]]
        for v, x in zip(eqn.outvars, outs):
          env[v] = x
      return [read(v) for v in jx.outvars]

    outs = run(closed_jaxpr.jaxpr, closed_jaxpr.consts, leaves, ())
    return outs, xs

  return f


def _zeros_of(aval):
  """Zeros of an aval, with its sharding where an explicit axis shards it.

  (So the tap's cotangent, the layer's output cotangent, keeps the
  output's sharding instead of being gathered to a replicated tap.)
  """
  sharding = getattr(aval, "sharding", None)
  spec = tuple(getattr(sharding, "spec", ()))
  if any(x is not None for x in spec):
    return jnp.zeros(aval.shape, aval.dtype, out_sharding=sharding)
  return jnp.zeros(aval.shape, aval.dtype)


def zero_taps(dense: list[DenseUse | None]) -> list:
  """Zeros of each tapped ``dot_general``'s output (None elsewhere)."""
  return [None if u is None else _zeros_of(u.eqn.outvars[0].aval)
          for u in dense]


def _dims(use: DenseUse, x_ndim: int):
  """``(x_batch, x_free, x_contract, out_batch, out_x_free, out_w_free)``."""
  (lc, rc), (lb, rb) = use.eqn.params["dimension_numbers"]
  lhs_nd = use.eqn.invars[0].aval.ndim
  rhs_nd = use.eqn.invars[1].aval.ndim
  l_free = [d for d in range(lhs_nd) if d not in lc and d not in lb]
  r_free = [d for d in range(rhs_nd) if d not in rc and d not in rb]
  nb = len(lb)
  if use.side == 1:          # param on the right: X = lhs
    xb, xc, xf = list(lb), list(lc), l_free
    out_xf = list(range(nb, nb + len(l_free)))
    out_wf = list(range(nb + len(l_free), nb + len(l_free) + len(r_free)))
  else:                      # param on the left: X = rhs
    xb, xc, xf = list(rb), list(rc), r_free
    out_wf = list(range(nb, nb + len(l_free)))
    out_xf = list(range(nb + len(l_free), nb + len(l_free) + len(r_free)))
  assert len(xb) + len(xc) + len(xf) == x_ndim
  return xb, xf, xc, list(range(nb)), out_xf, out_wf


def _as_bnc(x, d, use: DenseUse):
  """X as ``(B, N, C)`` and the stacked ``D`` as ``(T, B, N, F)``."""
  xb, xf, xc, ob, oxf, owf = _dims(use, x.ndim)
  xr = _grouped(jnp.transpose(x, xb + xf + xc),
                [len(xb), len(xf), len(xc)])
  perm = [0] + [1 + i for i in ob + oxf + owf]
  dr = _grouped(jnp.transpose(d, perm), [1, len(ob), len(oxf), len(owf)])
  return xr, dr


def _grouped(a, sizes):
  """``a`` reshaped to one axis per group of ``sizes`` consecutive axes.

  On explicit mesh axes a merged axis keeps the sharding of its group's
  first axis when the group's other axes are unsharded (a merge JAX
  accepts once it is named); any other sharded axis is gathered first.
  """
  starts = [sum(sizes[:k]) for k in range(len(sizes))]
  shape = tuple(math.prod(a.shape[s:s + n]) for s, n in zip(starts, sizes))
  spec = explicit_spec(a)
  if spec is None:
    return a.reshape(shape)
  spec = tuple(spec) + (None,) * (a.ndim - len(spec))
  keep, merged = list(spec), []
  for s, n in zip(starts, sizes):
    if n == 0:
      merged.append(None)
      continue
    for i in range(s + 1, s + n):
      keep[i] = None
    merged.append(keep[s])
  if tuple(keep) != spec:
    a = jax.sharding.reshard(a, on_mesh_of(a, *keep))
  return jax.lax.reshape(a, shape, out_sharding=on_mesh_of(a, *merged))


def uses_x_gram(x_shape_bnc, t: int) -> bool:
  """Whether the X-Gram route is the cheaper one for this layer.

  ``(X X^T)`` is ``B N^2`` numbers against ``T B C F`` for the per-task
  weight gradients: the X-Gram route is taken when ``N^2 <= T C F``.
  """
  _, n, c, f = x_shape_bnc
  return n * n <= t * c * f


def dense_gram(x, d, use: DenseUse) -> jax.Array:
  r"""``(T, T)`` Gram block of a ``dot_general`` param from ``X`` and ``D``.

  With ``X`` as ``(B, N, C)`` (dot batch, free, contracted axes) and the
  task cotangents ``D_t`` as ``(B, N, F)``, task ``t``'s gradient of the
  param is :math:`G_t[b] = X[b]^T D_t[b]`, so

  .. math::
    \langle G_s, G_t \rangle = \sum_b \sum_{n,m}
      (X[b] X[b]^T)_{nm} (D_s[b] D_t[b]^T)_{nm}.

  Computed as ``E_t = (X X^T) D_t`` then ``<D_s, E_t>`` (``B N^2 C +
  T B N^2 F + T^2 B N F`` flops, no ``T x T x N x N`` intermediate) when
  :func:`uses_x_gram` (on CPU with ``X X^T`` broadcast over the tasks when
  :func:`pcgrad_optax._core.cpu.broadcast_over_tasks`); otherwise ``G_t``
  is formed and contracted at once.
  Accumulates in f32 or wider at full precision.
  """
  acc = accumulation_dtype(jnp.result_type(x.dtype, d.dtype))
  xr, dr = _as_bnc(x, d, use)
  out = _out_shardings(xr, dr)
  xs, ds = _specs(xr, 3), _specs(dr, 4)
  hi = dict(precision=lax.Precision.HIGHEST, preferred_element_type=acc)
  t = dr.shape[0]
  if uses_x_gram((xr.shape[0],) + xr.shape[1:] + dr.shape[-1:], t):
    kx = jnp.einsum("bnc,bmc->bnm", xr, xr, out_sharding=out(xs[:2]), **hi)
    if cpu.broadcast_over_tasks(kx, dr):
      return _x_gram_on_cpu(kx, dr.astype(acc))
    e = jnp.einsum("bnm,tbmf->tbnf", kx, dr.astype(acc),
                   out_sharding=out((None,) + xs[:2] + ds[3:]), **hi)
    return jnp.einsum("sbnf,tbnf->st", dr.astype(acc), e,
                      out_sharding=out(()), **hi)
  g = jnp.einsum("bnc,tbnf->tbcf", xr, dr,
                 out_sharding=out((None, xs[0], xs[2], ds[3])), **hi)
  return jnp.einsum("sbcf,tbcf->st", g, g, out_sharding=out(()), **hi)


# _x_gram_on_cpu walks F in chunks of E = (X X^T) D of about this size.
_E_CHUNK_BYTES = 1 << 20
_MIN_E_CHUNK = 128


def _x_gram_on_cpu(k, d) -> jax.Array:
  """``sum_{b,n,f} D[s,b,n,f] (K[b] D[t,b])[n,f]``, as ``(T, T)``, on CPU.

  ``K`` ``(B, N, N)`` is broadcast over the tasks, behind a barrier so that
  the simplifier does not fold it back, which makes ``K D_t`` a batched
  matmul on ``D``'s own ``(T, B, N, F)`` layout
  (:func:`pcgrad_optax._core.cpu.broadcast_over_tasks`). ``F`` is walked in
  chunks of about 1 MiB of ``E = K D``: ``E`` never exists whole (it is as
  big as ``D``), and each chunk's contraction with its slice of ``D`` is
  cache-sized, where XLA:CPU would copy a whole ``(T, P)`` operand
  transposed. Figures: ``benchmarks/results/step_profile.md``.
  """
  t, b, n, f = d.shape
  hi = dict(precision=lax.Precision.HIGHEST, preferred_element_type=d.dtype)
  kt = lax.optimization_barrier(jnp.broadcast_to(k.astype(d.dtype),
                                                 (t,) + k.shape))
  chunk = min(f, max(_MIN_E_CHUNK,
                     _E_CHUNK_BYTES // (t * b * n * d.dtype.itemsize)))
  steps = f // chunk

  def block(dc):
    e = jnp.einsum("tbnm,tbmf->tbnf", kt, dc, **hi)
    return dot_cross(dc, e)

  def body(i, gram):
    return gram + block(lax.dynamic_slice_in_dim(d, i * chunk, chunk, 3))

  gram = lax.fori_loop(0, steps, body, jnp.zeros((t, t), d.dtype))
  if steps * chunk < f:
    gram = gram + block(d[..., steps * chunk:])
  return gram


def _specs(a, ndim: int) -> tuple:
  """a's PartitionSpec entries, one per dim (None where unsharded)."""
  spec = tuple(explicit_spec(a) or ())
  return spec + (None,) * (ndim - len(spec))


def _mesh_axes(entry) -> tuple:
  if entry is None:
    return ()
  return tuple(entry) if isinstance(entry, tuple) else (entry,)


def _out_shardings(xr, dr):
  """``out(spec)``: the ``out_sharding`` of a contraction of ``xr``/``dr``.

  None (the compiler's choice) unless an explicit mesh axis shards one of
  them; then ``spec`` on their mesh, each mesh axis kept at its first use
  only (an output may not be sharded twice over one axis).
  """
  ref = next((a for a in (xr, dr) if explicit_spec(a) is not None), None)

  def out(spec):
    if ref is None:
      return None
    seen, clean = set(), []
    for entry in spec:
      axes = _mesh_axes(entry)
      if not axes or seen & set(axes):
        clean.append(None)
      else:
        seen |= set(axes)
        clean.append(entry)
    return on_mesh_of(ref, *clean)

  return out


def dense_update(x, d_weighted, use: DenseUse, param):
  """The param's gradient for the output cotangent ``d_weighted``.

  The transpose of ``param -> dot_general(X, chain(param))``, so a param
  reached through a cast, transpose or reshape gets its own layout and
  dtype back.
  """
  eqn = use.eqn

  def forward(p):
    for c in use.chain:
      p = c.primitive.bind(p, **c.primitive.get_bind_params(c.params))
    operands = [x, p] if use.side == 1 else [p, x]
    return eqn.primitive.bind(*operands,
                              **eqn.primitive.get_bind_params(eqn.params))

  out_aval = eqn.outvars[0].aval
  d_weighted = d_weighted.astype(out_aval.dtype)
  if _explicitly_sharded(out_aval) or explicit_spec(d_weighted) is not None:
    # Under explicit axes the cotangent must have the output's exact type.
    d_weighted = jax.sharding.reshard(d_weighted, out_aval.sharding)
  primal = jax.ShapeDtypeStruct(param.shape, param.dtype,
                                sharding=_explicit_sharding(param))
  (g,) = jax.linear_transpose(forward, primal)(d_weighted)
  return g


def _explicitly_sharded(aval) -> bool:
  spec = tuple(getattr(getattr(aval, "sharding", None), "spec", ()))
  return any(x is not None for x in spec)


def _explicit_sharding(x):
  """x's sharding when it lives on a mesh with explicit axes, else None.

  (Replicated too: a transpose that contracts a sharded batch axis needs
  to know that the gradient is replicated, with or without jax.set_mesh.)
  """
  sharding = getattr(jax.typeof(x), "sharding", None)
  mesh = getattr(sharding, "mesh", None)
  types = getattr(mesh, "axis_types", ())
  return sharding if jax.sharding.AxisType.Explicit in tuple(types) else None
