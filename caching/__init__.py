"""Feature caching: one residual-cache engine, five reuse rules, forecasting and CFG reuse.

Importing this package registers ``teacache``, ``fbcache``, ``magcache``, ``easycache`` and
``fixed`` in ``CACHE_METHODS``; their configs are re-exported here.
"""
from .calibration import CacheCalibration, load_calibration, save_calibration
from .configs import (CacheConfig, EasyCacheConfig, FBCacheConfig, FixedCacheConfig, MagCacheConfig,
                      TeaCacheConfig)
from .methods import EasyCache, FBCache, FixedCache, MagCache, ResidualCache, TeaCache  # noqa: F401  (registration)

__all__ = [
    "CacheCalibration", "CacheConfig", "EasyCacheConfig", "FBCacheConfig", "FixedCacheConfig", "MagCacheConfig",
    "TeaCacheConfig", "load_calibration", "save_calibration",
]
