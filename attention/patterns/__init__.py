"""Block-sparse attention patterns: how each call's key blocks are chosen.

Each pattern is a small class with a validated config (``PatternConfig`` knobs plus its own) and
``block_layout(q, k, ctx) -> BlockPlan(layout, permutation, density)``. ``accel.attention.sparse`` turns
each into a registered attention method.
"""
from .base import BlockPattern, BlockPlan, Geometry, PatternConfig, geometry_of
from .cluster import ClusterConfig, ClusterPattern
from .radial import RadialConfig, RadialPattern
from .spatiotemporal import SpatiotemporalConfig, SpatiotemporalPattern
from .tile_window import TileWindowConfig, TileWindowPattern
from .topk import TopKConfig, TopKPattern

PATTERNS = {cls.name: cls for cls in (SpatiotemporalPattern, RadialPattern, TileWindowPattern, TopKPattern,
                                      ClusterPattern)}

__all__ = [
    "PATTERNS", "BlockPattern", "BlockPlan", "Geometry", "PatternConfig", "geometry_of",
    "SpatiotemporalPattern", "SpatiotemporalConfig", "RadialPattern", "RadialConfig",
    "TileWindowPattern", "TileWindowConfig", "TopKPattern", "TopKConfig", "ClusterPattern", "ClusterConfig",
]
