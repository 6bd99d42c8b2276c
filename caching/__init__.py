"""Feature caching (residual caches, forecasting); methods register here as they land."""
