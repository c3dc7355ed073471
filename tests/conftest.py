import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))

PATTERNS = ["dense", "axial", "block", "longformer", "strided", "random"]
# 1 x 1, a row, a column, odd sizes, and one larger map
SIZES = [(1, 1), (1, 9), (8, 1), (7, 13), (16, 16)]


def pytest_collection_modifyitems(config, items):
    import torch

    has_gpu = torch.cuda.is_available()
    for item in items:
        if "cuda" in item.keywords and not has_gpu:
            item.add_marker(pytest.mark.skip(reason="no CUDA GPU visible to torch"))
