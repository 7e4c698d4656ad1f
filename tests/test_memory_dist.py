"""MoCoQueue and HardNegativeMemory on 2 gloo processes: keys are gathered across ranks (rank order), so
every rank holds the same buffer, bit for bit the buffer of one process that wrote the global batches."""

import pytest
import torch

from mmalign import dist
from mmalign.memory import HardNegativeMemory, MoCoQueue
from test_dist import WORLD, _spawn

SIZE, DIM = 10, 3
ROWS = [(3, 3), (4, 2), (1, 5), (6, 6), (0, 2)]  # rows per rank at each step: equal, unequal, one side empty


def _part(step, rank):
    n = ROWS[step][rank]
    g = torch.Generator().manual_seed(100 * step + rank)
    return torch.randn(n, DIM, generator=g), torch.randint(0, 50, (n,), generator=g)


def _violators(step, rank):
    """Each rank mines its own violators on its own similarity matrix (how many differs between ranks)."""
    g = torch.Generator().manual_seed(7 + 100 * step + rank)
    feats = torch.randn(5, DIM, generator=g)
    sim = torch.randn(5, 5, generator=g)
    rows = HardNegativeMemory.select_violators(sim, k=1, margin=0.5 * (rank + 1))
    return feats[rows], (torch.arange(5) + 10 * rank)[rows]


def _fill(rank=None, gather=True):
    """The buffers after every step: on a rank (``rank`` given, its own rows), or in one process that writes
    each step's global batch, the ranks' rows concatenated in rank order (``rank=None``)."""
    queue, memory = MoCoQueue(SIZE, DIM), HardNegativeMemory(SIZE, DIM)
    for step in range(len(ROWS)):
        if rank is not None:
            queue.enqueue(*_part(step, rank), gather=gather)
            memory.write(*_violators(step, rank), gather=gather)
            continue
        keys, ids = zip(*[_part(step, r) for r in range(WORLD)])
        queue.enqueue(torch.cat(keys), torch.cat(ids))
        feats, fids = zip(*[_violators(step, r) for r in range(WORLD)])
        memory.write(torch.cat(feats), torch.cat(fids))
    return queue.state_dict(), memory.state_dict()


def _worker(rank, tmp):
    torch.save({"gathered": _fill(rank), "own": _fill(rank, gather=False)}, f"{tmp}/r{rank}.pt")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("memory_dist")
    _spawn(_worker, tmp)
    return [torch.load(tmp / f"r{r}.pt") for r in range(WORLD)]


def _equal(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) if isinstance(a[k], torch.Tensor) else a[k] == b[k]
                                        for k in a)


def test_every_rank_holds_the_one_process_queue_and_memory(runs):
    ref_queue, ref_memory = _fill()
    assert ref_queue["count"] == SIZE and ref_memory["count"] > 0
    for r in range(WORLD):
        queue, memory = runs[r]["gathered"]
        assert _equal(queue, ref_queue), r
        assert _equal(memory, ref_memory), r


def test_gather_false_keeps_a_buffer_per_process(runs):
    own = [runs[r]["own"][0] for r in range(WORLD)]
    assert not _equal(own[0], own[1])
    queue = MoCoQueue(SIZE, DIM)
    for step in range(len(ROWS)):
        queue.enqueue(*_part(step, 1))
    assert _equal(own[1], queue.state_dict())


def test_all_gather_rows_is_the_identity_in_one_process():
    x = torch.randn(3, 2)
    assert dist.all_gather_rows(x) is x
    with pytest.raises(TypeError, match="torch.Tensor"):
        dist.all_gather_rows([1.0])
