"""Chapter 00: Recall@K of linear projections of frozen features, before and after InfoNCE training."""

from __future__ import annotations

from ..config import Config, seed_everything
from ..data.features import scene_features
from ..recipes import evaluate, make_dual_encoder, train_dual_encoder
from ..retrieval import chance_recall


def run(cfg: Config, progress: bool = True) -> dict:
    seed_everything(cfg.seed)
    train, val, test = (scene_features(s, cfg, progress=progress) for s in ("train", "val", "test"))
    untrained = evaluate(make_dual_encoder(train, cfg.embed_dim), test)
    model, history = train_dual_encoder(train, val, cfg, progress=progress)
    trained = evaluate(model, test)
    k = test.world.captions_per_image
    chance = {f"i2t_R@{r}": 100 * chance_recall(len(test.texts), k, r) for r in (1, 5, 10)}
    chance.update({f"t2i_R@{r}": 100 * chance_recall(len(test.world), 1, r) for r in (1, 5, 10)})
    chance["rsum"] = sum(chance.values())
    return {
        "table": {"chance": chance, "random projection": untrained, "InfoNCE (trained)": trained},
        "best_epoch": history.best["epoch"] + 1,
        "sizes": {"train": len(train.world), "val": len(val.world), "test": len(test.world),
                  "captions_per_image": k},
    }
