"""The README's example runs as written."""

import pathlib
import re

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def test_readme_example_runs():
  blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
  assert blocks, "README has no python example"
  namespace = {}
  exec(compile(blocks[0], "README.md", "exec"), namespace)  # noqa: S102
  updates = namespace["updates"]
  assert updates["trunk"].shape == (8, 16)
  assert updates["heads"].shape == (2, 16)


def test_quickstart_has_exactly_two_commands():
  text = README.read_text()
  section = text.split("## Quickstart", 1)[1]
  block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
  commands = [line for line in block.splitlines() if line.strip()]
  assert len(commands) == 2
  assert "demo" in commands[0] and "pytest" in commands[1]
