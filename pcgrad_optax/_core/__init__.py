"""The Gram-matrix core shared by every method.

Stacked per-task gradients (every leaf with a leading task axis of size
``T``) take one path through the package::

  stacked gradients, params, shared=
    -> stacked.num_tasks, masks.shared_leaves  leaves, T, shared mask
    -> gram.masked_gram                        K = G G^T  (T, T), f32+
    -> a weighting, pcgrad_optax.weighting.*   w  (T,)
    -> weighted_sum.leaf_weighted_sum          sum_t w_t g_t, params-shaped

One pass over the leaves builds the Gram matrix, the method works on
``T x T`` numbers, a second pass forms the update; task heads (leaves outside
the ``shared`` mask) get the plain sum over their task axis. Nothing here
loops over tasks in Python, flattens the model, or builds a ``T x T x P``
intermediate. :mod:`~pcgrad_optax._core.aggregate` puts the path together,
:mod:`~pcgrad_optax._core.cpu` holds the XLA:CPU fast paths, and
:mod:`~pcgrad_optax._core.transform` what the optax transformations share.

The rest of the package imports each name from the submodule that defines
it; this file holds no code.
"""
