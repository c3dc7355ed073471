"""CPU benchmark; the same as `python -m sparse_attention bench` (see --help)."""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from sparse_attention.bench import main  # noqa: E402

if __name__ == "__main__":
    main()
