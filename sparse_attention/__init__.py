"""sparse_attention: sparse attention for computer-vision feature maps.

C kernels on the CPU, CUDA kernels on NVIDIA GPUs, tensors exchanged with
PyTorch and NumPy through DLPack without copies.
"""

from .functional import (buffer_cache_info, empty_buffer_cache, get_num_threads, set_buffer_cache_limit,
                         set_num_threads, sparse_scaled_dot_product_attention)
from .custom_layouts import (CustomPattern, layout_from_csr, layout_from_mask, layout_from_mask_mod,
                             layout_from_rule, neighborhood_layout, neighborhood_layout_3d)
from .patterns import Layout, SparsityPattern, build_layout

__version__ = "0.1.0"

__all__ = ["Layout", "SparsityPattern", "build_layout", "layout_from_rule", "layout_from_mask",
           "layout_from_csr", "layout_from_mask_mod", "neighborhood_layout", "neighborhood_layout_3d",
           "CustomPattern", "sparse_scaled_dot_product_attention",
           "set_num_threads", "get_num_threads", "set_buffer_cache_limit", "buffer_cache_info",
           "empty_buffer_cache", "__version__"]

try:  # the module needs torch; the op and layouts do not
    from .module import AttentionStats, EnhancedSparseAttention  # noqa: F401
    from .neighborhood import NeighborhoodAttention1D, NeighborhoodAttention2D, NeighborhoodAttention3D  # noqa: F401

    __all__ += ["EnhancedSparseAttention", "AttentionStats", "NeighborhoodAttention1D", "NeighborhoodAttention2D",
                "NeighborhoodAttention3D"]
except ImportError as _error:  # pragma: no cover - NumPy-only installs
    if "torch" not in str(_error):
        raise
