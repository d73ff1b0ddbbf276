"""pcgrad_optax.datasets: the multi-digit data set (multi_digits)."""

import sys

import numpy as np
import pytest

from pcgrad_optax import datasets


def test_multi_digits_deterministic_and_well_formed():
  a = datasets.multi_digits(64, 32, seed=3)
  b = datasets.multi_digits(64, 32, seed=3)
  c = datasets.multi_digits(64, 32, seed=4)
  for u, v in zip(a, b):
    np.testing.assert_array_equal(u, v)
  assert not np.array_equal(a.x_train, c.x_train)
  assert a.x_train.shape == (64, 12, 12) and a.x_train.dtype == np.float32
  assert a.y_train.shape == (64, 2) and a.y_train.dtype == np.int32
  assert a.x_test.shape == (32, 12, 12) and a.y_test.shape == (32, 2)
  assert a.y_train.min() >= 0 and a.y_train.max() <= 9
  assert 0.0 <= a.x_train.min() and a.x_train.max() <= 1.0
  clean = datasets.multi_digits(16, 8, seed=0, canvas=(8, 16), noise=0.0)
  assert clean.x_train.shape == (16, 8, 16)
  # without noise on an 8 x 16 canvas the digits overlap by at most two
  # columns: the outer six columns of each are an exact digit of its label
  from sklearn.datasets import load_digits
  digits = load_digits()
  imgs = (digits.images / 16.0).astype(np.float32)
  for img, (left, right) in zip(clean.x_train[:4], clean.y_train[:4]):
    assert any(np.array_equal(img[:, c:c + 6], d[:, :6])
               for c in (0, 1) for d in imgs[digits.target == left])
    assert any(np.array_equal(img[:, 10 - c:16 - c], d[:, 2:])
               for c in (0, 1) for d in imgs[digits.target == right])


@pytest.mark.parametrize("kwargs, match", [
    (dict(canvas=(7, 12)), "canvas"), (dict(canvas=(12, 17)), "canvas"),
    (dict(noise=-1.0), "noise"), (dict(test_fraction=1.0), "test_fraction"),
    (dict(num_train=0), "num_train")])
def test_multi_digits_bad_input(kwargs, match):
  args = dict(num_train=8, num_test=8)
  args.update(kwargs)
  with pytest.raises(ValueError, match=match):
    datasets.multi_digits(**args)


def test_multi_digits_without_sklearn(monkeypatch):
  monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
  with pytest.raises(ImportError, match="scikit-learn"):
    datasets.multi_digits(8, 8)
