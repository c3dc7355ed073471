from .patterns import SparsityPattern, Layout, build_layout
