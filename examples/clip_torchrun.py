"""A small CLIP-style model trained under torchrun, outside the course: a learnable temperature, negatives
mined on the gathered batch, a queue of past text keys gathered across processes, a checkpoint and a resume.

    torchrun --standalone --nproc_per_node 2 examples/clip_torchrun.py --out /tmp/clip
    python examples/clip_torchrun.py --out /tmp/clip1            # the same in one process

Run it again with the same ``--out`` and it resumes from ``OUT/checkpoint.pt`` (``--max-steps N`` stops
early, as an interrupted run would). On ``W`` processes each one reads ``batch / W`` pairs of every global
batch; ``mmalign.train.fit`` trains through DistributedDataParallel, keeps the temperature (it lives in the
model) and the queue (``stateful``) in its checkpoints, and the result equals the 1-process run.
tests/test_clip_example.py runs it on 2 CPU processes (gloo).

The loss of a batch of image and text embeddings ``zi``, ``zt`` (scene ``ids``; W processes):

* the symmetric InfoNCE of the gathered batch over each row's positives and its 8 hardest gathered
  negatives (``hardest_negatives`` on the gathered similarity, ``dist.gathered_info_nce(negatives=)``);
* plus half of MoCo's loss of the image queries against a queue of past text keys from every process
  (``MoCoQueue.enqueue`` gathers them), entries of the query's own scene masked.
Both use the model's learned temperature (``LearnableTemperature``, CLIP's parameterisation).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from mmalign import dist
from mmalign.losses import moco_loss
from mmalign.memory import MoCoQueue
from mmalign.miners import hardest_negatives
from mmalign.models.temperature import LearnableTemperature
from mmalign.retrieval import recall_at_k, similarity
from mmalign.train import fit

D_IMAGE, D_TEXT, D_EMBED = 24, 16, 16


class TinyCLIP(nn.Module):
    """Two towers into one space, and the temperature inside the model (trained and saved with it)."""

    def __init__(self):
        super().__init__()
        self.image = nn.Sequential(nn.Linear(D_IMAGE, 32), nn.GELU(), nn.Linear(32, D_EMBED))
        self.text = nn.Sequential(nn.Linear(D_TEXT, 32), nn.GELU(), nn.Linear(32, D_EMBED))
        self.temperature = LearnableTemperature(0.1)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return F.normalize(self.image(x), dim=-1), F.normalize(self.text(y), dim=-1)


def synthetic_pairs(n: int = 512, captions: int = 2, seed: int = 0):
    """``n`` (image, caption) feature pairs of ``n // captions`` scenes: both views are noisy linear
    maps of a scene's latent vector. Returns (images (n, D_IMAGE), captions (n, D_TEXT), ids (n,))."""
    g = torch.Generator().manual_seed(seed)
    latent = torch.randn(n // captions, 8, generator=g)
    a, b = torch.randn(8, D_IMAGE, generator=g), torch.randn(8, D_TEXT, generator=g)
    ids = torch.arange(n) // captions
    images = latent[ids] @ a + 0.3 * torch.randn(n, D_IMAGE, generator=g)
    texts = latent[ids] @ b + 0.3 * torch.randn(n, D_TEXT, generator=g)
    return images, texts, ids


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="folder for the checkpoint and the result")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch", type=int, default=64, help="global batch size (split across processes)")
    parser.add_argument("--max-steps", type=int, default=None, help="stop after this many steps (then resume)")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    distributed = dist.init("gloo")
    torch.manual_seed(0)  # the same initial weights on every process (fit also broadcasts rank 0's)
    images, texts, ids = synthetic_pairs()
    model = TinyCLIP()
    queue = MoCoQueue(128, D_EMBED)

    def step(m, batch):
        x, y, scene = batch
        zi, zt = m(x, y)
        tau = m.temperature()
        gathered = similarity(dist.all_gather(zi).detach(), dist.all_gather(zt).detach())
        mined = hardest_negatives(gathered, ids=dist.all_gather_ids(scene), k=8)
        loss = dist.gathered_info_nce(zi, zt, temperature=tau, ids=scene, negatives=mined)
        if len(queue):
            loss = loss + 0.5 * moco_loss(zi, zt, queue.keys, temperature=tau, ids=(scene, queue.ids))
        queue.enqueue(zt.detach(), scene)  # every process's keys, in rank order
        return loss

    history = fit(model, step, (images, texts, ids), optimizer=torch.optim.AdamW(model.parameters(), lr=3e-3),
                  epochs=args.epochs, batch_size=args.batch, seed=0, device="cpu", stateful={"queue": queue},
                  checkpoint_path=out / "checkpoint.pt", max_steps=args.max_steps, progress=False, desc="tiny CLIP")
    model.eval()
    with torch.no_grad():
        zi, zt = model(images, texts)
    result = {"steps": len(history.loss), "first_loss": history.loss[0], "last_loss": history.loss[-1],
              "tau": model.temperature().item(), "t2i_R@1": recall_at_k(zt, zi, ids, ids, (1,))[1],
              "queue": len(queue), "world_size": dist.world_size() if distributed else 1}
    if dist.rank() == 0:
        torch.save({k: v.detach().clone() for k, v in model.state_dict().items()}, out / "final_weights.pt")
        (out / "result.json").write_text(json.dumps(result, indent=1))
    if distributed:
        dist.cleanup()
    return result


if __name__ == "__main__":
    print(main())
