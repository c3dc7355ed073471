"""Every Python code block of README.md runs as written, and its links lead somewhere."""

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


def relative_links(path):
    """Targets of the Markdown links and images in ``path`` that name files in the repository."""
    with open(path) as fh:
        text = fh.read()
    targets = re.findall(r"\]\(([^)\s]+)\)", text)
    return [t.split("#", 1)[0] for t in targets if not re.match(r"[a-z]+:", t) and not t.startswith("#")]


@pytest.mark.parametrize("document", ["README.md", "docs/cpu_benchmark_records.md", "CHANGELOG.md"])
def test_relative_links_point_at_files(document):
    root = os.path.dirname(README)
    path = os.path.join(root, document)
    links = relative_links(path)
    missing = [t for t in links if not os.path.exists(os.path.join(os.path.dirname(path), t))]
    assert missing == []
    if document != "CHANGELOG.md":
        assert links, f"{document}: expected links to check"
