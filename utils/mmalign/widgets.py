"""ipywidgets explorers shared by the chapters."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from .plots import image_to_text_html, text_to_image_grid
from .retrieval import top_k


def retrieval_explorer(images: np.ndarray, texts: Sequence[str], image_emb: torch.Tensor,
                       text_emb: torch.Tensor, image_ids, text_ids, k: int = 5):
    """Pick a caption or an image and see its top-k matches in the other modality.

    images: (N, H, W, 3) uint8; texts: M captions; image_emb (N, D), text_emb (M, D) in one space;
    image_ids (N,), text_ids (M,): equal ids are correct matches. Returns an ipywidgets VBox.
    """
    import ipywidgets as w
    import matplotlib.pyplot as plt
    from IPython.display import HTML, display

    if len(images) != image_emb.shape[0] or len(texts) != text_emb.shape[0]:
        raise ValueError(
            f"{len(images)} images for {image_emb.shape[0]} image embeddings and {len(texts)} captions for "
            f"{text_emb.shape[0]} text embeddings: pass matching lists"
        )
    image_ids = torch.as_tensor(image_ids)
    text_ids = torch.as_tensor(text_ids)
    mode = w.ToggleButtons(options=["caption → images", "image → captions"], description="query")
    index = w.BoundedIntText(value=0, min=0, max=len(texts) - 1, description="caption #")
    out = w.Output()

    def render(*_):
        with out:
            out.clear_output(wait=True)
            if mode.value.startswith("caption"):
                index.max, index.description = len(texts) - 1, "caption #"
                i = min(index.value, len(texts) - 1)
                scores, idx = top_k(text_emb[i:i + 1], image_emb, k)
                fig = text_to_image_grid([texts[i]], images, idx, image_ids[idx] == text_ids[i])
                display(fig)  # plt.show takes no figure; display it into `out`, then close it so that
                plt.close(fig)  # the inline backend does not show it a second time below the widget
            else:
                index.max, index.description = len(images) - 1, "image #"
                i = min(index.value, len(images) - 1)
                scores, idx = top_k(image_emb[i:i + 1], text_emb, k)
                display(HTML(image_to_text_html(images[i:i + 1], texts, idx, text_ids[idx] == image_ids[i], scores)))

    mode.observe(render, names="value")
    index.observe(render, names="value")
    render()
    return w.VBox([w.HBox([mode, index]), out])
