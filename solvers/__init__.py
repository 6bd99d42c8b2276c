"""Scheduler swaps and few-step samplers; methods register here as they land."""
