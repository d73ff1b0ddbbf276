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
  # The one-call form after it, on the params the first one produced.
  exec(compile(blocks[1], "README.md", "exec"), namespace)  # noqa: S102
  assert namespace["update"]["trunk"].shape == (8, 16)
  assert int(namespace["agg_state"].count) == 1


def test_readme_nnx_example_runs():
  # The "Flax NNX" section trains with nnx.Optimizer; its batch statistics
  # and dropout RNG count move once per step, as with nnx.value_and_grad.
  section = README.read_text().split("## Flax NNX", 1)[1].split("\n## ", 1)[0]
  blocks = re.findall(r"```python\n(.*?)```", section, re.S)
  assert len(blocks) == 2, "the Flax NNX section has two python examples"
  namespace = {}
  exec(compile(blocks[0], "README.md", "exec"), namespace)  # noqa: S102
  model, optimizer = namespace["model"], namespace["optimizer"]
  steps = int(optimizer.step[...])
  assert steps == 5
  assert int(model.drop.rngs.count[...]) == steps
  assert float(abs(model.bn.mean[...]).max()) > 0     # the batch stats moved
  assert namespace["predictions"].shape == (32, 2)
  assert namespace["losses"].shape == (2,)
  # The second: value_and_aggregate's Gram engine on the module itself.
  exec(compile(blocks[1], "README.md", "exec"), namespace)  # noqa: S102
  assert namespace["losses"].shape == (2,)
  assert int(namespace["agg_state"].count) == 1
  assert int(model.drop.rngs.count[...]) == steps + 1


def test_quickstart_has_exactly_two_commands():
  text = README.read_text()
  section = text.split("## Quickstart", 1)[1]
  block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
  commands = [line for line in block.splitlines() if line.strip()]
  assert len(commands) == 2
  assert "demo" in commands[0] and "pytest" in commands[1]
