"""Small multi-task data sets built from data that ships with packages.

Nothing is downloaded: :func:`multi_digits` composes scikit-learn's bundled
8x8 handwritten digits (``sklearn.datasets.load_digits``, 1797 images) into a
two-task problem in the spirit of MultiMNIST.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

DIGIT_SIZE = 8


class MultiDigits(NamedTuple):
  """A two-task multi-digit data set.

  Attributes:
    x_train: ``(N_train, H, W)`` float32 images in ``[0, 1]``.
    y_train: ``(N_train, 2)`` int32 labels: the left digit (task 0) and the
      right digit (task 1).
    x_test: ``(N_test, H, W)`` float32 images.
    y_test: ``(N_test, 2)`` int32 labels.
  """
  x_train: np.ndarray
  y_train: np.ndarray
  x_test: np.ndarray
  y_test: np.ndarray


def multi_digits(num_train: int = 6000, num_test: int = 2000, *,
                 seed: int = 0, canvas: tuple[int, int] = (12, 12),
                 noise: float = 0.05,
                 test_fraction: float = 0.3) -> MultiDigits:
  """Two overlapping handwritten digits per image; predict both.

  The 1797 digits of ``sklearn.datasets.load_digits`` are split once into a
  train pool and a test pool (``test_fraction`` of them), so test images are
  made of digits never seen in training. Each image draws two digits
  independently from its pool and pastes the first at the left edge and the
  second at the right edge of an ``H x W`` canvas, each at a random vertical
  offset and with a horizontal jitter of one pixel; where they overlap the
  brighter pixel wins (as in MultiMNIST). Pixel values are scaled to
  ``[0, 1]``, Gaussian noise of standard deviation ``noise`` is added and the
  result clipped to ``[0, 1]``. Task 0 is the left digit's class, task 1 the
  right digit's. Everything is deterministic given ``seed``.

  With the default 12 x 12 canvas the two 8-pixel-wide digits share four to
  six columns, so the tasks compete for the same pixels.

  Args:
    num_train: number of training images.
    num_test: number of test images.
    seed: seed of the pool split, the pairing, the placement and the noise.
    canvas: ``(H, W)``, each at least 8 (and ``W`` at most 16, so the digits
      overlap or touch).
    noise: standard deviation of the additive Gaussian pixel noise (>= 0).
    test_fraction: share of the source digits reserved for the test pool,
      in ``(0, 1)``.

  Returns:
    A :class:`MultiDigits` of NumPy arrays.

  Raises:
    ImportError: if scikit-learn is not installed.
    ValueError: on an invalid size, canvas, noise or fraction.

  Example:
    >>> from pcgrad_optax import datasets
    >>> data = datasets.multi_digits(100, 50, seed=0)
    >>> data.x_train.shape, data.y_train.shape, data.x_test.shape
    ((100, 12, 12), (100, 2), (50, 12, 12))
    >>> bool(data.x_train.min() >= 0 and data.x_train.max() <= 1)
    True
  """
  for name, n in (("num_train", num_train), ("num_test", num_test)):
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
      raise ValueError(f"{name} must be a positive int, got {n!r}.")
  try:
    height, width = (int(c) for c in canvas)
  except (TypeError, ValueError):
    raise ValueError(f"canvas must be (H, W), got {canvas!r}.") from None
  if height < DIGIT_SIZE or not DIGIT_SIZE <= width <= 2 * DIGIT_SIZE:
    raise ValueError(
        f"canvas {tuple(canvas)} must have H >= {DIGIT_SIZE} and "
        f"{DIGIT_SIZE} <= W <= {2 * DIGIT_SIZE}.")
  if not noise >= 0:
    raise ValueError(f"noise must be >= 0, got {noise!r}.")
  if not 0 < test_fraction < 1:
    raise ValueError(
        f"test_fraction must lie in (0, 1), got {test_fraction!r}.")
  try:
    from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError(
        "pcgrad_optax.datasets.multi_digits needs scikit-learn for its "
        "bundled handwritten digits: pip install scikit-learn (or "
        "pcgrad_optax[test]).") from e

  digits = load_digits()
  images = (digits.images / 16.0).astype(np.float32)        # (1797, 8, 8)
  labels = digits.target.astype(np.int32)
  rng = np.random.default_rng(seed)
  order = rng.permutation(len(images))
  num_pool_test = int(round(test_fraction * len(images)))
  pools = (order[num_pool_test:], order[:num_pool_test])

  def compose(pool, n):
    pick = rng.choice(pool, size=(n, 2))
    out = np.zeros((n, height, width), np.float32)
    rows = rng.integers(0, height - DIGIT_SIZE + 1, size=(n, 2))
    jitter = rng.integers(0, 2, size=(n, 2)) if width > DIGIT_SIZE + 1 \
        else np.zeros((n, 2), np.int64)
    cols = np.stack([jitter[:, 0],
                     width - DIGIT_SIZE - jitter[:, 1]], axis=1)
    r = np.arange(DIGIT_SIZE)
    idx = np.arange(n)[:, None, None]
    for side in range(2):
      rr = (rows[:, side, None] + r)[:, :, None]
      cc = (cols[:, side, None] + r)[:, None, :]
      out[idx, rr, cc] = np.maximum(out[idx, rr, cc], images[pick[:, side]])
    if noise > 0:
      out += rng.normal(0.0, noise, out.shape).astype(np.float32)
    np.clip(out, 0.0, 1.0, out=out)
    return out, labels[pick]

  x_train, y_train = compose(pools[0], int(num_train))
  x_test, y_test = compose(pools[1], int(num_test))
  return MultiDigits(x_train, y_train, x_test, y_test)
