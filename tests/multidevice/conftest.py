"""The multi-device checks run only in the child process of test_sharding.py.

They need 8 simulated CPU devices, which JAX must be told about before it
starts (JAX_NUM_CPU_DEVICES=8); tests/test_sharding.py starts a fresh Python
with that set, plus PCGRAD_OPTAX_MULTIDEVICE=1, and runs pytest on this
folder. Any other pytest run skips the folder entirely (not even imported for
doctests), so it never sees a JAX already configured with one device.
"""

import os

if os.environ.get("PCGRAD_OPTAX_MULTIDEVICE") != "1":
  collect_ignore_glob = ["*"]
elif os.environ.get("JAX_NUM_CPU_DEVICES") != "8":
  # Checked here, before any module of the folder imports JAX.
  raise RuntimeError(
      "tests/multidevice must run with JAX_NUM_CPU_DEVICES=8 set before JAX "
      "starts; run tests/test_sharding.py instead.")
