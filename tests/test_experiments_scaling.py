"""Chapter 9's experiment code (mmalign.experiments.scaling and its worker): the torchrun launch, the memory
of the global and local gathered loss, and the losses of the softmax-vs-sigmoid comparison, against
hand counts and the library's losses."""

import threading

import pytest
import torch

from mmalign.config import load_config
from mmalign.data.features import FeatureSplit
from mmalign.experiments import scaling
from mmalign.experiments.scaling_worker import logits_bytes, loss_memory
from mmalign.losses import info_nce, siglip_loss


def test_torchrun_picks_no_port_in_advance():
    cmd = scaling.torchrun_command(["--out", "x"], nproc=3)
    assert cmd[1:6] == ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=3", "-m"]
    assert cmd[-2:] == ["--out", "x"] and not any("port" in c for c in cmd)
    with pytest.raises(ValueError, match="nproc"):
        scaling.torchrun_command([], nproc=0)


def test_concurrent_launches_each_get_their_own_rendezvous():
    """Two 2-process launches at once (each rendezvous on localhost:0) both finish with their own results."""
    results, errors = {}, []

    def launch(batch):
        try:
            results[batch] = scaling.local_loss_memory([batch], nproc=2, dim=4, timeout=300)
        except Exception as err:  # noqa: BLE001 - reported below
            errors.append(err)

    threads = [threading.Thread(target=launch, args=(b,)) for b in (8, 12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for batch, out in results.items():
        assert out["world_size"] == 2 and out["dim"] == 4 and "--standalone" in out["command"]
        row = out["sizes"][str(batch)]
        assert row["global: logits MB"] == batch * batch * 4 / 2**20  # 2 processes: the same count
        assert row["local: logits MB"] == 2 * (batch // 2) * batch * 4 / 2**20
        assert row["max |gradient difference|"] <= 1e-6 * row["max |gradient|"]  # the same gradients
        assert row["global: peak MB"] >= row["global: logits MB"] and row["local: peak MB"] > 0


def test_logits_bytes_hand_counts():
    # the example: B = 32768 on 8 processes, float32 logits
    assert logits_bytes(32768, 8, local_loss=False) == 32768 * 32768 * 4 == 4_294_967_296  # 4.3 GB a process
    assert logits_bytes(32768, 8, local_loss=True) == 2 * 4096 * 32768 * 4 == 1_073_741_824  # 1.1 GB
    assert logits_bytes(64, 2, local_loss=True) == logits_bytes(64, 2, local_loss=False)  # 2 x (B/2) x B = B x B
    assert logits_bytes(64, 1, local_loss=True) == 64 * 64 * 4  # one process: the plain loss
    assert logits_bytes(64, 4, local_loss=True, itemsize=2) == 2 * 16 * 64 * 2
    with pytest.raises(ValueError, match="divisible"):
        logits_bytes(10, 4, local_loss=True)
    with pytest.raises(ValueError, match="world must be a positive int"):
        logits_bytes(10, 0, local_loss=True)


def test_loss_memory_in_one_process_measures_the_plain_loss():
    out = loss_memory([64], dim=8)["64"]
    assert out["max |gradient difference|"] == 0.0  # one process: local_loss changes nothing
    assert out["global: logits MB"] == out["local: logits MB"] == 64 * 64 * 4 / 2**20
    assert out["global: peak MB"] >= out["global: logits MB"] and out["local: peak MB"] >= out["local: logits MB"]


def _pair(seed=0, n=10, d=6):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g), torch.randn(n, d, generator=g), torch.arange(n) // 2


def test_loss_variants_start_at_their_papers_settings():
    zi, zt, ids = _pair()
    expected = {scaling.SOFTMAX_LEARNED: (info_nce(zi, zt, temperature=0.07, ids=ids), 1),
                scaling.SIGMOID_LEARNED: (siglip_loss(zi, zt, temperature=0.1, bias=-10.0, ids=ids), 2),
                scaling.SOFTMAX_FIXED: (info_nce(zi, zt, temperature=0.07, ids=ids), 0)}
    for name, (want, n_extra) in expected.items():
        loss, extra, settings = scaling.loss_variant(name)
        torch.testing.assert_close(loss(zi, zt, ids), want, rtol=1e-6, atol=1e-6)
        assert len(extra) == n_extra and all(p.requires_grad for p in extra)
        assert settings()["τ after training"] == pytest.approx(0.1 if "SigLIP" in name else 0.07, rel=1e-6)
    assert scaling.loss_variant(scaling.SIGMOID_LEARNED)[2]()["b after training"] == -10.0
    # a learned setting receives the loss's gradient
    loss, extra, _ = scaling.loss_variant(scaling.SIGMOID_LEARNED)
    loss(zi, zt, ids).backward()
    assert all(p.grad is not None and float(p.grad.abs()) > 0 for p in extra)
    with pytest.raises(ValueError, match="name must be one of"):
        scaling.loss_variant("triplet")


def _split(seed, n_scenes=16, k=2):
    g = torch.Generator().manual_seed(seed)
    image = torch.randn(n_scenes, 6, generator=g)
    text_ids = torch.arange(n_scenes).repeat_interleave(k)
    text = image[text_ids] @ torch.randn(6, 5, generator=g) + 0.3 * torch.randn(n_scenes * k, 5, generator=g)
    return FeatureSplit(None, image, text, [f"c{i}" for i in range(n_scenes * k)], text_ids, torch.arange(n_scenes))


def test_softmax_vs_sigmoid_rows():
    cfg = load_config("ci", embed_dim=4, lr=1e-2)
    train, test = _split(0), _split(1)
    out = scaling.softmax_vs_sigmoid(train, test, cfg, (8, 16), epochs=2, progress=False, seed=3)
    assert list(out) == [f"{name}, batch {b}" for b in (8, 16) for name in scaling.LOSS_VARIANTS]
    # the fixed-temperature InfoNCE at the whole batch is the candidates sweep's whole-batch run (same seed)
    sweep = scaling.negatives_sweep(train, test, cfg.replace(batch_size=16), (16,), 2, progress=False, seed=3)
    assert out[f"{scaling.SOFTMAX_FIXED}, batch 16"] == {**sweep["16 candidates"], "τ after training": 0.07}
    for b in (8, 16):  # the learned temperature and bias moved
        assert out[f"{scaling.SOFTMAX_LEARNED}, batch {b}"]["τ after training"] != pytest.approx(0.07, abs=1e-5)
        assert out[f"{scaling.SIGMOID_LEARNED}, batch {b}"]["b after training"] != pytest.approx(-10.0, abs=1e-5)
    with pytest.raises(ValueError, match="batch_sizes"):
        scaling.softmax_vs_sigmoid(train, test, cfg, (1,), epochs=1, progress=False)
