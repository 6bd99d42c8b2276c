"""Reuse decisions stay outside compiled regions: compiled blocks are one graph with no breaks."""
import torch
from torch._dynamo.utils import counters as dynamo_counters

import accel
from accel.caching import FixedCacheConfig
from accel.pipelines.tiny import build_tiny_pipeline


def test_cache_runs_with_regionally_compiled_blocks(helpers):
    config = FixedCacheConfig(interval=2, forecast="taylor")
    pipe = build_tiny_pipeline("wan")
    with accel.patched(pipe, cache=config):
        eager = helpers.run(pipe, "wan", 4)

    torch._dynamo.reset()
    dynamo_counters.clear()
    # fullgraph=True fails loudly if anything inside a block would break the graph; the "eager"
    # backend keeps the test fast while still tracing every block through dynamo.
    pipe.transformer.compile_repeated_blocks(fullgraph=True, backend="eager")
    with accel.patched(pipe, cache=config) as handle:
        compiled = helpers.run(pipe, "wan", 4)
        assert sum(helpers.counters(handle)["steps_reused"].values()) == 4
    assert dynamo_counters["stats"]["unique_graphs"] >= 1
    assert not dynamo_counters["graph_break"]
    torch.testing.assert_close(compiled, eager, atol=1e-6, rtol=0)
