"""The engine's own behaviour: gates, per-branch state, CFG reuse, counters, exact restore."""
import warnings

import pytest
import torch

import accel
from accel.base.changes import ChangeLog
from accel.caching import FBCacheConfig, FixedCacheConfig, TeaCacheConfig
from accel.caching.diffusers_host import GATE_ATTR
from accel.caching.state import BranchState
from accel.caching.streams import StreamBinding
from accel.pipelines.tiny import TINY_FAMILIES, build_tiny_pipeline, tiny_call_kwargs


def gated(block) -> bool:
    return GATE_ATTR in vars(block)


def test_set_class_gives_one_instance_a_subclass_and_undo_restores_it():
    class Traced(torch.nn.ReLU):
        pass

    parent = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.ReLU(), torch.nn.ReLU())
    changes = ChangeLog()
    changes.set_class(parent[1], Traced)
    assert type(parent[1]) is Traced and type(parent[2]) is torch.nn.ReLU
    changes.undo_all()
    assert type(parent[1]) is torch.nn.ReLU
    with pytest.raises(TypeError, match="not a subclass"):
        ChangeLog().set_class(parent[1], torch.nn.Tanh)


def test_consecutive_reuse_cap(helpers):
    pipe = build_tiny_pipeline("wan")
    handle = accel.patch(pipe, cache=FixedCacheConfig(compute_steps=(0,), max_consecutive_reuses=2))
    decisions = helpers.decisions(handle)
    helpers.run(pipe, "wan", 8)
    handle.remove()
    for branch in ("cond", "uncond"):
        assert helpers.branch(decisions, branch) == [False, True, True, False, True, True, False, True]


def test_warmup_and_final_steps_are_computed_in_every_generation(helpers):
    pipe = build_tiny_pipeline("flux")
    handle = accel.patch(pipe, cache=FixedCacheConfig(compute_steps=(), warmup_steps=2, warmup_ratio=0.3,
                                                      final_steps=2))
    decisions = helpers.decisions(handle)
    helpers.run(pipe, "flux", 8)
    helpers.run(pipe, "flux", 8)
    handle.remove()
    # ceil(0.3 * 8) = 3 warm-up steps beat warmup_steps=2; the last 2 are computed
    assert helpers.branch(decisions, "cond") == [False, False, False, True, True, True, False, False] * 2


def test_each_cfg_branch_has_its_own_state(helpers):
    pipe = build_tiny_pipeline("hunyuan_video")  # true CFG: separate cond and uncond calls
    handle = accel.patch(pipe, cache=FixedCacheConfig(warmup_steps=1))
    engine = handle.methods["cache"].engine
    engine.rule = helpers.AlwaysReuse()
    decisions = helpers.decisions(handle)
    helpers.run(pipe, "hunyuan_video", 4)
    branches = engine.plans[0].branches
    assert set(branches) == {"cond", "uncond"}
    assert branches["cond"].rule_state is not branches["uncond"].rule_state
    assert branches["cond"].rule_state.calls == branches["uncond"].rule_state.calls == 4
    assert branches["cond"].history[-1][1]["hidden_states"] is not branches["uncond"].history[-1][1]["hidden_states"]
    assert helpers.branch(decisions, "cond") == helpers.branch(decisions, "uncond") == [False, True, True, True]
    handle.remove()


def test_cfg_reuse_with_identical_branches_reproduces_dense(helpers):
    pipe = build_tiny_pipeline("wan")
    same = {"negative_prompt": tiny_call_kwargs("wan")["prompt"]}
    dense = helpers.run(pipe, "wan", 6, **same)
    handle = accel.patch(pipe, cache=FixedCacheConfig(interval=1, cfg_reuse_steps=(2, 3, 5)))
    cached = helpers.run(pipe, "wan", 6, **same)
    counters = helpers.counters(handle)
    handle.remove()
    # uncond = cond residual at this step + (uncond - cond) at the last full step, which is 0 here
    assert counters["cfg_reused"] == {"cond": 0, "uncond": 3}
    assert counters["steps_reused"] == {"cond": 0, "uncond": 3}
    torch.testing.assert_close(cached, dense, atol=1e-5, rtol=0)


def test_cfg_reused_step_is_a_point_of_the_uncond_forecast(helpers):
    # identical branches: a cfg-reused uncond residual equals cond's, so the uncond forecast of the
    # next skipped step must equal cond's too, which needs the reused step in the uncond history
    pipe = build_tiny_pipeline("wan")
    same = {"negative_prompt": tiny_call_kwargs("wan")["prompt"]}
    forecast = dict(compute_steps=(0, 1, 2, 4), forecast="taylor", order=1, schedule="uniform")
    handle = accel.patch(pipe, cache=FixedCacheConfig(**forecast))
    plain = helpers.run(pipe, "wan", 6, **same)
    handle.remove()
    handle = accel.patch(pipe, cache=FixedCacheConfig(**forecast, cfg_reuse_steps=(2, 4)))
    reused = helpers.run(pipe, "wan", 6, **same)
    assert helpers.counters(handle)["cfg_reused"] == {"cond": 0, "uncond": 2}
    handle.remove()
    torch.testing.assert_close(reused, plain, atol=1e-5, rtol=0)


def test_cfg_reuse_changes_uncond_with_distinct_branches(helpers):
    pipe = build_tiny_pipeline("wan")
    dense = helpers.run(pipe, "wan", 6)
    handle = accel.patch(pipe, cache=FixedCacheConfig(interval=1, cfg_reuse_interval=2))
    cached = helpers.run(pipe, "wan", 6)
    assert helpers.counters(handle)["cfg_reused"] == {"cond": 0, "uncond": 3}  # steps 1, 3 and 5
    handle.remove()
    assert not torch.equal(cached, dense) and torch.isfinite(cached).all()


def test_cfg_reuse_on_batched_cfg_warns_and_caches_one_branch(helpers):
    pipe = build_tiny_pipeline("cogvideox")
    handle = accel.patch(pipe, cache=FixedCacheConfig(interval=1, cfg_reuse_steps=(1, 2)))
    with pytest.warns(RuntimeWarning, match="batches both halves"):
        helpers.run(pipe, "cogvideox", 3)
    assert helpers.counters(handle)["cfg_reused"] == {"cond_uncond": 0}
    handle.remove()


@pytest.mark.parametrize("forecast,order,tensors", [("none", 1, 2), ("taylor", 2, 6), ("foca", 1, 6)])
def test_counters_and_memory(helpers, forecast, order, tensors):
    pipe = build_tiny_pipeline("flux")  # 2 dual + 2 single blocks; the span is blocks 1..2
    handle = accel.patch(pipe, cache=FixedCacheConfig(interval=2, first_blocks=1, last_blocks=1,
                                                      forecast=forecast, order=order))
    helpers.run(pipe, "flux", 6)
    counters = helpers.counters(handle)
    assert counters["calls"] == {"cond": 6} and counters["steps_reused"] == {"cond": 3}
    assert counters["blocks_reused"] == {"cond": 3 * 2} and counters["blocks_computed"] == {"cond": 6 * 4 - 6}
    assert counters["compute_fraction"] == pytest.approx(18 / 24)
    # one residual per stream per kept step: image and text stream, 16 tokens x 32 channels, fp32
    assert counters["cache_tensors"] == tensors and counters["cache_bytes"] == tensors * 16 * 32 * 4
    handle.remove()
    after = helpers.counters(handle)
    assert after["cache_bytes"] == 0 and after["peak_cache_bytes"] >= tensors * 16 * 32 * 4


def test_no_block_left_to_cache_is_an_error():
    pipe = build_tiny_pipeline("wan")  # 2 blocks
    with pytest.raises(ValueError, match="leave no block to cache"):
        accel.patch(pipe, cache=FBCacheConfig(first_blocks=1, last_blocks=1))
    assert not any(gated(b) or type(b) is not type(pipe.transformer.blocks[0]) for b in pipe.transformer.blocks), \
        "a failed patch leaves nothing"


def test_remove_restores_modules_attributes_and_output(helpers):
    pipe = build_tiny_pipeline("hunyuan_video")
    model = pipe.transformer
    reference = helpers.run(pipe, "hunyuan_video", 4)
    blocks = [list(model.transformer_blocks), list(model.single_transformer_blocks)]
    classes = [type(b) for stack in blocks for b in stack]
    keys, attrs = list(model.state_dict()), dict(vars(model))
    hooks = {name: (len(m._forward_pre_hooks), len(m._forward_hooks)) for name, m in model.named_modules()}

    handle = accel.patch(pipe, attention="dense", cache=TeaCacheConfig(threshold=10.0, forecast="foca"))
    assert all(gated(b) for b in model.transformer_blocks)
    assert [list(model.transformer_blocks), list(model.single_transformer_blocks)] == blocks, "blocks stay in place"
    cached = helpers.run(pipe, "hunyuan_video", 4)
    summary = handle.summary()["methods"]
    handle.remove()

    assert summary["attention"]["counters"]["calls"] > 0, "attention methods reach the gated blocks"
    assert sum(summary["cache"]["counters"]["steps_reused"].values()) > 0
    assert not torch.equal(cached, reference)
    assert [list(model.transformer_blocks), list(model.single_transformer_blocks)] == blocks
    assert [type(b) for stack in blocks for b in stack] == classes
    assert list(model.state_dict()) == keys and dict(vars(model)) == attrs
    assert hooks == {name: (len(m._forward_pre_hooks), len(m._forward_hooks)) for name, m in model.named_modules()}
    assert torch.equal(helpers.run(pipe, "hunyuan_video", 4), reference)


def test_wan22_caches_both_experts(helpers):
    pipe = build_tiny_pipeline("wan22")
    handle = accel.patch(pipe, cache=FixedCacheConfig(compute_steps=(0,), warmup_steps=0))
    helpers.run(pipe, "wan22", 6)
    engine = handle.methods["cache"].engine
    assert [p.model for p in engine.plans] == [pipe.transformer, pipe.transformer_2]
    assert all(gated(b) for b in pipe.transformer_2.blocks)
    assert helpers.counters(handle)["calls"] == {"cond": 6, "uncond": 6}
    # the rule reuses from step 1 on, but each expert has its own cache: the low-noise expert computes
    # at its first step, then reuses
    assert helpers.counters(handle)["steps_reused"] == {"cond": 4, "uncond": 4}
    handle.remove()


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_block_io_matches_the_blocks(family):
    """Each block's declared outputs are exactly what the model's loop hands the next block."""
    pipe = build_tiny_pipeline(family)
    model = pipe.transformer
    adapter = accel.api.adapter_for(model)
    seen = []  # (binding, streams in, streams out) per block call, in order
    hooks = []
    for stack in adapter.block_stacks(model):
        for i, block in enumerate(stack.blocks):
            binding = StreamBinding(block, stack.io, f"{stack.name}.{i}")

            def hook(module, args, kwargs, output, binding=binding):
                seen.append((binding.streams(args, kwargs), binding.unpack(output)))

            hooks.append(block.register_forward_hook(hook, with_kwargs=True))
    kwargs = {**tiny_call_kwargs(family, steps=2), "output_type": "latent"}
    pipe(**kwargs)
    for h in hooks:
        h.remove()
    num_blocks = sum(len(s.blocks) for s in adapter.block_stacks(model))
    calls = [seen[i:i + num_blocks] for i in range(0, len(seen), num_blocks)]
    assert calls and all(len(c) == num_blocks for c in calls)
    for call in calls:
        for (_, out), (next_in, _) in zip(call, call[1:]):
            assert set(out) == set(next_in)
            for name in out:
                assert out[name] is next_in[name], f"{family}: output {name!r} is not the next block's {name!r}"


def test_no_warnings_on_the_normal_path(helpers):
    pipe = build_tiny_pipeline("ltx")
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        with accel.patched(pipe, cache="teacache"):
            helpers.run(pipe, "ltx", 3)


@pytest.mark.parametrize("family,ndim", [("wan", 2), ("cogvideox", 2), ("hunyuan_video", 3), ("ltx", 3),
                                         ("flux", 3)])
def test_teacache_measures_the_adapters_input(family, ndim, helpers):
    """Wan and CogVideoX: the time embedding (what their coefficients were fitted on); the others:
    block 0's modulated, normed visual input (batch, tokens, channels)."""
    pipe = build_tiny_pipeline(family)
    handle = accel.patch(pipe, cache=TeaCacheConfig(threshold=0.0))
    rule = handle.methods["cache"].engine.rule
    inputs, original = [], rule.propose
    rule.propose = lambda state, probe: inputs.append(probe.modulated_input) or original(state, probe)
    temb = []
    if family == "wan":
        hook = pipe.transformer.condition_embedder.register_forward_hook(lambda m, a, out: temb.append(out[0]))
    helpers.run(pipe, family, 2)
    handle.remove()
    assert len(inputs) >= 2 and all(x.ndim == ndim for x in inputs)
    if family == "wan":
        hook.remove()
        assert all(x is t for x, t in zip(inputs, temb))


def test_history_restarts_when_the_token_layout_changes():
    state = BranchState(rule_state=None)
    for step in range(3):
        state.remember(step, {"hidden_states": torch.zeros(1, 4, 2)}, keep=3)
    state.remember(2, {"hidden_states": torch.ones(1, 4, 2)}, keep=3)  # same step again: replaces
    assert [s for s, _ in state.history] == [0, 1, 2] and state.history[-1][1]["hidden_states"].sum() == 8
    state.remember(3, {"hidden_states": torch.zeros(1, 9, 2)}, keep=3)
    assert [s for s, _ in state.history] == [3]


def test_a_second_cache_from_diffusers_is_refused_both_ways():
    """diffusers' enable_cache on a model accel caches, and accel's cache on a model diffusers
    caches: a ValueError naming the conflict and the fix, and the model is left as it was."""
    from diffusers import FirstBlockCacheConfig

    import accel
    from accel.caching import FBCacheConfig
    from accel.pipelines.tiny import build_tiny_pipeline, tiny_call_kwargs

    pipe = build_tiny_pipeline("wan")
    kwargs = {**tiny_call_kwargs("wan", steps=2), "output_type": "latent"}
    reference = pipe(**kwargs).frames
    handle = accel.patch(pipe, cache=FBCacheConfig(threshold=0.05))
    with pytest.raises(ValueError, match=r"cached by accel.*handle\.remove\(\)"):
        pipe.transformer.enable_cache(FirstBlockCacheConfig(threshold=0.2))
    handle.remove()
    pipe.transformer.enable_cache(FirstBlockCacheConfig(threshold=0.2))  # once removed, diffusers' own works
    with pytest.raises(ValueError, match=r"cache: WanTransformer3DModel already has diffusers' cache.*disable_cache"):
        accel.patch(pipe, cache=FBCacheConfig(threshold=0.05))
    pipe.transformer.disable_cache()
    assert torch.equal(pipe(**{**kwargs, "generator": tiny_call_kwargs("wan")["generator"]}).frames, reference)
    with accel.patched(pipe, attention="dense"):  # attention alone composes with diffusers' cache
        pipe.transformer.enable_cache(FirstBlockCacheConfig(threshold=0.2))
        pipe.transformer.disable_cache()
