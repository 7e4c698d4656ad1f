"""The one training loop of the course: device and mixed-precision aware, seeded, with a progress bar,
a history for plots, evaluation with best-checkpoint tracking, checkpoints that resume exactly, and
data-parallel training under ``torchrun`` through PyTorch's ``DistributedDataParallel``.

A typical call::

    def step(model, batch):                     # batch: a tuple of tensors already on the device
        img, txt, ids = batch
        zi, zt = model(img, txt)
        return info_nce(zi, zt, temperature=0.07, ids=ids)  # or (loss, {"metric": value})

    history = fit(model, step, (img_feats, txt_feats, ids), optimizer=torch.optim.Adam(model.parameters()),
                  epochs=10, batch_size=128, seed=0, eval_fn=lambda m: {"rsum": ...}, keep_best="rsum")

Exact resume: the order of batches in epoch e comes from a generator seeded with (seed, e), so a run
restarted from a checkpoint skips the batches it had already done and continues with the same ones;
model, optimizer, every parameter the optimizer updates (also outside the model), scheduler, grad
scaler, RNG states and any ``stateful`` objects (a queue, a memory, a margin schedule) are restored.

The package shows its parts, each usable on its own in a loop of your own:

* :mod:`mmalign.train.loop`: :func:`fit`, :func:`train_step` (one optimizer step, logged) and
  :func:`record_eval` (one evaluation, logged, best weights kept);
* :mod:`mmalign.train.state`: :class:`TrainState` (everything a checkpoint holds),
  :func:`save_checkpoint` / :func:`load_checkpoint`, :func:`run_fingerprint` and
  :func:`outside_parameters` (what the optimizer updates outside the model);
* :mod:`mmalign.train.distributed`: the ``DistributedDataParallel`` wrapper of the loss;
* :mod:`mmalign.train.gradcache`: :func:`grad_cache_loss`, contrastive batches larger than memory.

Everything is importable from ``mmalign.train`` itself (``from mmalign.train import fit``) and
documented here.
"""

from . import distributed, gradcache, loop, state
from .distributed import LossModule, wrap_ddp
from .gradcache import grad_cache_loss
from .loop import epoch_order, fit, record_eval, to_device, train_step
from .state import (History, OutsideParameter, TrainState, load_checkpoint, outside_parameters, run_fingerprint,
                    save_checkpoint)

__all__ = ["fit", "train_step", "record_eval", "epoch_order", "to_device", "History", "TrainState",
           "save_checkpoint", "load_checkpoint", "run_fingerprint", "outside_parameters", "OutsideParameter",
           "LossModule", "wrap_ddp", "grad_cache_loss"]

# One public home, as numpy does (numpy._utils.set_module): the reference documents these objects here,
# and the chapters link #mmalign.train.fit; the submodules document their parts without :members:.
for _name in __all__:
    globals()[_name].__module__ = __name__
del _name
