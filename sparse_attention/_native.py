"""Loads the compiled extension, with an error that says how to get it."""

try:
    # torch first where it is installed: the extension's OpenMP loops then run
    # on the libgomp torch ships (one runtime, one thread pool for both)
    # rather than torch running on the system's.
    import torch  # noqa: F401
except ImportError:
    pass

try:
    from . import _C  # noqa: F401
except ImportError as error:  # pragma: no cover - exercised only on broken installs
    raise ImportError(
        "sparse_attention._C, the compiled extension, could not be imported "
        f"({error}). Install the package with `pip install .` from the source tree "
        "(a C compiler and NumPy >= 2 headers are needed), or build it in place with "
        "`python setup.py build_ext --inplace`."
    ) from error

C = _C
