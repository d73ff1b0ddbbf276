"""Hypothesis settings shared by the property tests.

``HYP``: 20 derandomized examples, no deadline, every health check off; the
Gram-based aggregators' and the stateful / loss-based methods' property tests
use it (tests/aggregation/test_pcgrad.py keeps its own, with 30 examples and
no example database). ``finite``: keyword arguments of ``st.floats`` for
finite float32 elements.
"""

from __future__ import annotations

import hypothesis


HYP = hypothesis.settings(deadline=None, max_examples=20, derandomize=True,
                          suppress_health_check=list(hypothesis.HealthCheck))

finite = dict(allow_nan=False, allow_infinity=False, width=32)
