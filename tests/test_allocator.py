"""The caching-allocator model (tools/memory/allocator.py) on hand-computed sequences: rounding, the two
pools and their segment sizes, splitting, best-fit reuse, merging, per-stream pools, release on
pressure, expandable segments."""

from __future__ import annotations

import pytest

from tools.memory.allocator import CachingAllocator, OutOfMemory, allocation_size, replay, round_size

KIB, MIB = 1024, 1024**2


def test_rounding_and_segment_sizes():
    assert round_size(1) == 512 and round_size(512) == 512 and round_size(513) == 1024
    assert allocation_size(512) == 2 * MIB and allocation_size(MIB) == 2 * MIB  # small pool: 2 MiB segments
    assert allocation_size(MIB + 512) == 20 * MIB and allocation_size(10 * MIB - 512) == 20 * MIB
    assert allocation_size(10 * MIB) == 10 * MIB and allocation_size(11 * MIB + 512) == 12 * MIB


def test_small_pool_packs_2mib_segments():
    a = CachingAllocator()
    blocks = [a.malloc(1) for _ in range(4096)]  # 4096 x 512 B fill one 2 MiB segment exactly
    assert a.stats.reserved == 2 * MIB and a.stats.allocated == 2 * MIB and a.stats.requested == 4096
    a.malloc(100)
    assert a.stats.reserved == 4 * MIB and a.stats.segments == 2
    for b in blocks:
        a.free(b)
    a.malloc(MIB)  # the merged free 2 MiB segment serves a 1 MiB request: no new segment
    assert a.stats.reserved == 4 * MIB


def test_large_pool_splits_20mib_segments_and_reuses_best_fit():
    a = CachingAllocator()
    x = a.malloc(MIB + 1)  # 1 MiB + 512 rounded, from a new 20 MiB segment, split
    assert a.stats.reserved == 20 * MIB and a.stats.allocated == MIB + 512
    y = a.malloc(5 * MIB)  # fits the 19 MiB - 512 remainder
    big = a.malloc(12 * MIB)  # best fit is still that segment's 14 MiB - 512 rest (split: 2 MiB - 512 left)
    assert a.stats.reserved == 20 * MIB and a.stats.segments == 1
    big2 = a.malloc(13 * MIB)  # nothing cached fits: its own segment, rounded up to 2 MiB
    assert a.stats.reserved == 34 * MIB
    a.free(big2)
    for b in (x, y, big):
        a.free(b)  # x, y, big and the rest merge back into one free 20 MiB block
    z = a.malloc(13 * MIB + 512)  # best fit: the 14 MiB block, not the 20 MiB one
    assert z.size == 14 * MIB  # its rest (1 MiB - 512) is not > 1 MiB: handed out whole
    assert a.stats.allocated == 14 * MIB and a.stats.requested == 13 * MIB + 512
    w = a.malloc(15 * MIB)  # the merged 20 MiB block, split (5 MiB rest)
    assert w.size == 15 * MIB and a.stats.reserved == 34 * MIB


def test_remainder_of_1mib_or_less_is_not_split_in_the_large_pool():
    a = CachingAllocator()
    b = a.malloc(19 * MIB + 512 * KIB)  # segment 20 MiB, rest 0.5 MiB: whole block
    assert b.size == 20 * MIB and a.stats.peak_allocated == 20 * MIB and a.stats.peak_requested == 19.5 * MIB


def test_streams_keep_separate_pools():
    a = CachingAllocator()
    x = a.malloc(100 * MIB, "default")
    a.free(x)
    y = a.malloc(100 * MIB, "all_gather")  # the freed default-stream block cannot serve another stream
    assert a.stats.reserved == 200 * MIB
    a.free(y)
    a.malloc(100 * MIB, "default")
    a.malloc(100 * MIB, "all_gather")
    assert a.stats.reserved == 200 * MIB
    assert a.stats.reserved_by_stream == {"default": 100 * MIB, "all_gather": 100 * MIB}


def test_capacity_releases_unsplit_cached_blocks_then_ooms():
    a = CachingAllocator(capacity=100 * MIB)
    x = a.malloc(60 * MIB)
    a.free(x)
    a.malloc(70 * MIB, "other")  # 60 + 70 > 100: release the cached 60 MiB segment, retry
    assert a.stats.reserved == 70 * MIB and a.stats.releases == 1
    with pytest.raises(OutOfMemory):
        a.malloc(40 * MIB)


def test_expandable_segments_grow_instead_of_fragmenting():
    plain, exp = CachingAllocator(), CachingAllocator(expandable_segments=True)
    for a in (plain, exp):
        x = a.malloc(30 * MIB)
        a.free(x)
        a.malloc(50 * MIB)
    assert plain.stats.reserved == 80 * MIB  # a new 50 MiB segment next to the cached 30 MiB one
    # one segment in 20 MiB pages: 30 MiB mapped as 40, then extended by one page to 60
    assert exp.stats.reserved == 60 * MIB and exp.stats.segments == 1


def test_expandable_segments_split_any_remainder_and_keep_streams_apart():
    a = CachingAllocator(expandable_segments=True)
    b = a.malloc(19 * MIB + 512 * KIB)
    assert b.size == 19 * MIB + 512 * KIB  # split: the 0.5 MiB rest is a free block
    a.malloc(256 * KIB)  # small pool: its own 2 MiB-page segment
    a.malloc(512 * KIB, "reduce_scatter")
    assert a.stats.reserved == 20 * MIB + 2 * MIB + 2 * MIB and a.stats.segments == 3


def test_replay_of_an_event_log():
    events = [(1, "a", 100 * MIB, "forward"), (1, "b", 3 * MIB, "forward"), (0, "a", 0, ""),
              (1, "c", 100 * MIB, "fsdp_all_gather@all_gather"), (0, "c", 0, ""), (1, "d", 80 * MIB, "backward"),
              (1, "h", 10**9, "host"), (0, "never-allocated", 0, "")]
    st = replay(events)
    assert st.peak_requested == 103 * MIB  # a + b; the host storage never reaches the device
    # a's 100 MiB segment serves d (split, 20 MiB rest); c could not reuse it (other stream); b's 20 MiB
    assert st.peak_reserved == 220 * MIB and st.reserved_by_stream == {"default": 120 * MIB, "all_gather": 100 * MIB}
    assert st.allocated == st.requested == 83 * MIB


def test_stream_of_tags():
    from tools.memory.allocator import stream_of

    assert stream_of("forward") == "default" and stream_of("fsdp_all_gather") == "default"  # copy-out: default stream
    assert stream_of("fsdp_reduce_scatter") == "reduce_scatter"
    assert stream_of("fsdp_all_gather@all_gather_copy_in") == "all_gather_copy_in"


def test_tracker_event_log_of_a_real_step_replays_to_its_peak():
    """The tracker's event log (off by default: `live` stays a plain dict) carries the step's exact order:
    replayed, the live bytes peak where the storage counter's peak is, and reserved covers them."""
    import torch
    import transformers

    from tools.memory.tracker import make_tracker

    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=512)
    torch.manual_seed(0)
    net = transformers.AutoModelForCausalLM.from_config(cfg)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    quiet = make_tracker(fake=False)
    assert type(quiet.live) is dict  # no log unless asked
    tracker = make_tracker(fake=False)
    events = tracker.log_events()
    ids = torch.randint(0, 512, (2, 32))
    with tracker:
        for _ in range(2):
            net(input_ids=ids, labels=ids).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    st = replay(events)
    assert len(events) > 100 and {e[0] for e in events} == {0, 1}
    assert st.peak_requested == tracker.peak
    assert st.peak_reserved >= st.peak_allocated >= st.peak_requested
    assert replay(events, expandable_segments=True).peak_reserved <= st.peak_reserved + 2 * MIB


def test_simulated_step_carries_the_replay_and_the_estimator_says_which_model(monkeypatch):
    from tools.estimator import estimate
    from tools.memory import simulate
    from tools.models import lookup_model
    from tools.schemas import TrainingSetup

    m = lookup_model("HuggingFaceTB/SmolLM2-135M", hub=False)
    s = TrainingSetup(model_id=m.model_id, max_length=256, per_device_train_batch_size=2)
    step = simulate(m, s)
    assert step.allocator_overhead_bytes is not None and step.allocator_overhead_bytes > 0
    one = estimate(m, s, step=step, advice=False)
    assert any("flat" in p and "one GPU" in p for p in one.provenance)
    monkeypatch.setenv("TUNEPILOT_ALLOCATOR", "replay")
    rep = estimate(m, s, step=step, advice=False)
    assert rep.breakdown["allocator_overhead"] == pytest.approx(step.allocator_overhead_bytes / 1024**3, abs=1e-3)
    assert any("replayed" in p for p in rep.provenance)
    # a sharded setup whose step is one unsharded replica keeps the flat factor and says why
    monkeypatch.delenv("TUNEPILOT_ALLOCATOR")
    sh = estimate(m, s.model_copy(update={"num_gpus": 2, "fsdp": "full_shard"}), step=step, advice=False,
                  reshard_moments=False)
    assert any("not simulated sharded" in p for p in sh.provenance)


@pytest.mark.parametrize("method,tol", [("lora", 0.25), ("full", 0.25)])
def test_replay_extrapolated_from_two_depths_tracks_the_full_depth_replay(method, tol):
    """The overhead is replayed at 1 and 2 blocks and extended; against a replay of all 30 blocks."""
    from tools.memory import simulate
    from tools.models import lookup_model
    from tools.schemas import TrainingSetup

    m = lookup_model("HuggingFaceTB/SmolLM2-135M", hub=False)
    s = TrainingSetup(model_id=m.model_id, max_length=512, per_device_train_batch_size=2, method=method)
    ext, full = simulate(m, s), simulate(m, s, extrapolate=False)
    assert ext.peak_bytes == full.peak_bytes
    assert ext.allocator_overhead_bytes == pytest.approx(full.allocator_overhead_bytes, rel=tol)


def test_fsdp_all_gather_buffers_get_the_copy_in_streams_pool(monkeypatch):
    """FSDP2 allocates its flat all-gather input/output under all_gather_copy_in_stream (torch's
    _fsdp_collectives.foreach_all_gather): the replay gives them that stream's pool, which the default
    stream never reuses, while the breakdown still counts them as fsdp_all_gather."""
    import tools.memory.extrapolate as X
    from tools.memory import simulate
    from tools.models import lookup_model
    from tools.schemas import TrainingSetup

    seen = []
    orig = X.combine

    def spy(runs, *a, **k):
        seen.extend(r.allocator for r in runs)
        return orig(runs, *a, **k)

    monkeypatch.setattr("tools.memory.runner.combine", spy)
    m = lookup_model("HuggingFaceTB/SmolLM2-135M", hub=False)
    s = TrainingSetup(model_id=m.model_id, max_length=256, per_device_train_batch_size=2, method="lora",
                      num_gpus=2, fsdp="full_shard", seed=11)  # seed: a fresh cache key
    step = simulate(m, s)
    assert step.world_size == 2 and step.peak_breakdown.get("fsdp_all_gather", 0) > 0
    assert not any("@" in k for k in step.peak_breakdown)
    # one decoder block all-gathered in bf16 (MixedPrecisionPolicy param_dtype): 2 B per parameter
    h, i, kv = m.hidden_size, m.intermediate_size, m.num_key_value_heads * (m.hidden_size // m.num_attention_heads)
    block = 2 * (2 * h * h + 2 * h * kv + 3 * h * i + 2 * h)
    for al in seen:
        pool = al["by_stream"].get("all_gather_copy_in", 0)
        assert pool >= block  # at least the unit in flight, in its own segments
        assert al["reserved"] >= al["by_stream"]["default"] + pool


@pytest.mark.parametrize("method", [
    "lora",
    # known gap: the per-block growth of the cached bytes seen between 3 and 4 blocks (6 MiB) is a third
    # of what 30 blocks hold (13.5 MiB per block: the sharded gradients' 20 MiB segments on the
    # reduce-scatter stream fill in steps); the extension reads -35%
    pytest.param("full", marks=pytest.mark.xfail(strict=True, reason="two-depth extension of a stepwise pool")),
])
def test_sharded_replay_extrapolated_tracks_the_full_depth_replay(method):
    """Sharded runs replay 3 and 4 blocks; the extension stays within 25% of a replay of all 30 blocks
    (a one-block jump of the cached bytes is not extended over the remaining blocks)."""
    from tools.memory import simulate
    from tools.models import lookup_model
    from tools.schemas import TrainingSetup

    m = lookup_model("HuggingFaceTB/SmolLM2-135M", hub=False)
    s = TrainingSetup(model_id=m.model_id, max_length=512, per_device_train_batch_size=2, method=method,
                      num_gpus=2, fsdp="full_shard")
    ext, full = simulate(m, s), simulate(m, s, extrapolate=False)
    assert ext.allocator_overhead_bytes == pytest.approx(full.allocator_overhead_bytes, rel=0.25)
