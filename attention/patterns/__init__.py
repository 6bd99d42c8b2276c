"""Block-sparse attention patterns: how each call's key blocks are chosen.

Each pattern is a small class with a validated config (``PatternConfig`` knobs plus its own) and
``block_layout(q, k, ctx) -> BlockPlan(layout, permutation, density)``, registered in
``SPARSE_PATTERNS`` by ``@register_pattern``; ``accel.attention.sparse`` turns every entry into an
attention method of the same name. A new pattern is one module here and one import line below.
"""
from .base import SPARSE_PATTERNS, BlockPattern, BlockPlan, Geometry, PatternConfig, geometry_of, register_pattern
from .spatiotemporal import SpatiotemporalConfig, SpatiotemporalPattern
from .radial import RadialConfig, RadialPattern
from .tile_window import TileWindowConfig, TileWindowPattern
from .topk import TopKConfig, TopKPattern
from .cluster import ClusterConfig, ClusterPattern
