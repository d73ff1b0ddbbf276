"""What the benchmark scripts need to know about the machine they run on."""

from __future__ import annotations

import platform
import time


def load1() -> float:
  """The 1-minute load average (Linux)."""
  with open("/proc/loadavg") as f:
    return float(f.read().split()[0])


def wait_for_quiet(max_wait: float, threshold: float = 1.0,
                   poll: float = 30.0) -> tuple:
  """Polls the 1-minute load until < threshold or max_wait seconds pass.

  Returns ``(load, seconds waited)``.
  """
  t0 = time.time()
  load = load1()
  while load >= threshold and time.time() - t0 < max_wait:
    print(f"  1-min load {load:.2f} >= {threshold}; waiting "
          f"({time.time() - t0:.0f}/{max_wait:.0f} s)", flush=True)
    time.sleep(poll)
    load = load1()
  return load, time.time() - t0


def cpu_name() -> str:
  """The CPU's model name, or what the platform module knows."""
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()
