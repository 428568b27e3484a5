"""The background batch prefetcher (training.data.prefetch) and the host-sync-free GPU draws.

The CUDA side (side stream, events, record_stream) runs in `make test-gpu` through the
trained-model test; here the thread mechanics run on the CPU.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import pytest
import torch
from reference_augment import dihedral_indexed

from training.data.augment import Augment, apply_dihedral, draw_coins, draw_jitter, make_patches
from training.data.prefetch import prefetched, tensors_in

CPU = torch.device("cpu")


def _alive() -> bool:
    return any(t.name == "batch-prefetch" and t.is_alive() for t in threading.enumerate())


def test_items_arrive_in_order_and_the_thread_ends():
    assert list(prefetched(lambda: iter(range(50)), CPU, depth=3)) == list(range(50))
    assert not _alive()


def test_a_producer_error_is_raised_in_the_consumer_after_the_items_before_it():
    def source():
        yield from range(3)
        raise ValueError("bad shard")

    got = []
    with pytest.raises(ValueError, match="bad shard"):
        for item in prefetched(source, CPU):
            got.append(item)
    assert got == [0, 1, 2] and not _alive()


def test_producer_stays_at_most_depth_ahead_and_closing_stops_it():
    produced, closed = [], threading.Event()

    def source():
        try:
            for i in range(1000):
                produced.append(i)
                yield i
        finally:
            closed.set()

    it = prefetched(source, CPU, depth=2)
    assert next(it) == 0
    time.sleep(0.3)  # let the producer run as far as it may
    # item 0 handed over, 2 queued, 1 made and waiting for room: 4 at most
    assert len(produced) <= 4
    it.close()
    assert closed.wait(2) and not _alive()
    assert len(produced) < 10


def test_depth_must_be_positive():
    with pytest.raises(ValueError, match="depth"):
        next(prefetched(lambda: iter([1]), CPU, depth=0))


def test_tensors_in_finds_every_tensor_of_a_batch():
    @dataclass
    class Inner:
        a: torch.Tensor
        keys: list

    @dataclass
    class Outer:
        x: torch.Tensor
        inner: Inner
        extra: dict

    t1, t2, t3 = torch.zeros(1), torch.ones(2), torch.arange(3)
    found = list(tensors_in(Outer(t1, Inner(t2, ["k"]), {"m": [t3, "s"]})))
    assert len(found) == 3 and all(any(f is t for t in (t1, t2, t3)) for f in found)


# --------------------------------------------------------------------------- GPU draws
def test_select_and_indexed_dihedral_give_the_same_patches():
    gen = torch.Generator().manual_seed(3)
    x = torch.rand(16, 3, 8, 8, generator=gen)
    coins = draw_coins(16, gen)
    assert coins.any() and not coins.all()
    assert torch.equal(apply_dihedral(x, coins), dihedral_indexed(x, coins))


def test_jitter_order_comes_from_the_order_generator_when_given():
    aug = Augment()
    base = draw_jitter(8, aug, torch.Generator().manual_seed(0))
    other = draw_jitter(
        8, aug, torch.Generator().manual_seed(0), order_generator=torch.Generator().manual_seed(7)
    )
    expected = torch.randperm(4, generator=torch.Generator().manual_seed(7)).tolist()
    names = ["brightness", "contrast", "saturation", "hue"]
    assert [n for n, _ in other.steps] == [names[i] for i in expected]
    # the factors are the same draws, whatever the order
    assert {n: f.tolist() for n, f in base.steps} == {n: f.tolist() for n, f in other.steps}


def test_make_patches_with_an_order_generator_is_reproducible():
    regions = torch.randint(
        0, 256, (2, 3, 96, 96), dtype=torch.uint8, generator=torch.Generator().manual_seed(1)
    )
    labels = torch.zeros(2, 3, 3, dtype=torch.uint8)

    def run():
        return make_patches(
            regions,
            labels,
            grid=3,
            patch=24,
            train=True,
            aug=Augment(),
            generator=torch.Generator().manual_seed(2),
            fused=False,
            order_generator=torch.Generator().manual_seed(5),
        )[0]

    a, b = run(), run()
    assert torch.equal(a, b) and a.shape == (18, 3, 24, 24)
