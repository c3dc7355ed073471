"""Every Python code block of README.md runs as written."""

import os
import re

import pytest

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")


def python_blocks():
    with open(README) as fh:
        text = fh.read()
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def test_readme_has_exactly_two_setup_commands():
    with open(README) as fh:
        text = fh.read()
    setup = text.split("## Set-up", 1)[1].split("##", 1)[0]
    commands = [line for block in re.findall(r"```bash\n(.*?)```", setup, flags=re.S)
                for line in block.splitlines() if line.strip() and not line.startswith("#")]
    assert commands == [
        "python -m pip install -r requirements-demo.txt -e . && python -m sparse_attention demo",
        "python -m pip install -r requirements-test.txt -e . && python -m pytest -q",
    ]
    with open(os.path.join(os.path.dirname(README), ".ci", "run")) as fh:
        assert "python -m pip install -q -r requirements-test.txt -e . && python -m pytest -q" in fh.read()


@pytest.mark.parametrize("index", range(len(python_blocks())))
def test_readme_block_runs(index):
    import matplotlib

    matplotlib.use("Agg")
    namespace = {}
    exec(compile(python_blocks()[index], f"README.md block {index}", "exec"), namespace)
