"""COCO / Flickr8k / Flickr30k with the Karpathy splits (Karpathy & Fei-Fei, 2015).

The split file (``dataset_coco.json``, ``dataset_flickr8k.json``, ``dataset_flickr30k.json``) is::

    {"dataset": "coco", "images": [{"filepath": "val2014", "filename": "COCO_val2014_000000391895.jpg",
      "imgid": 0, "split": "test", "sentences": [{"raw": "A man riding ...", "tokens": [...]}, ...]}, ...]}

``filepath`` exists for COCO only; an image lives at ``image_root / filepath / filename``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from PIL import Image

SPLITS_URL = "https://cs.stanford.edu/people/karpathy/deepimagesent/caption_datasets.zip"
IMAGES_HELP = (
    "COCO: download train2014.zip and val2014.zip from https://cocodataset.org/#download and unzip both "
    "into image_root (giving image_root/train2014/, image_root/val2014/); Flickr8k/30k: put the .jpg files "
    "directly in image_root"
)


def load_karpathy_split(
    json_path: str | Path,
    image_root: str | Path,
    split: str | tuple[str, ...] = "train",
    check_files: bool = True,
) -> list[tuple[Path, list[str], int]]:
    """Entries of one Karpathy split: ``(image_path, [raw captions], imgid)``, in file order.

    Args:
        json_path: ``dataset_coco.json`` / ``dataset_flickr8k.json`` / ``dataset_flickr30k.json``.
        image_root: folder holding the images (see the module docstring for the layout).
        split: ``"train"``, ``"val"``, ``"test"``, ``"restval"`` (COCO), or a tuple of them;
            the usual COCO training set is ``("train", "restval")``.
        check_files: raise FileNotFoundError if any image of the split is missing.

    Returns:
        List of ``(Path, list of str, int)``.
    """
    json_path, image_root = Path(json_path), Path(image_root)
    if not json_path.is_file():
        raise FileNotFoundError(
            f"{json_path} not found: download the Karpathy splits ({SPLITS_URL}), unzip, and pass the path of "
            "dataset_coco.json, dataset_flickr8k.json or dataset_flickr30k.json"
        )
    if not image_root.is_dir():
        raise FileNotFoundError(f"image folder {image_root} not found. {IMAGES_HELP}")
    with open(json_path, encoding="utf-8") as f:
        data = json.load(f)
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise ValueError(f"{json_path} is not a Karpathy split file: expected a JSON object with an 'images' list")
    wanted = (split,) if isinstance(split, str) else tuple(split)
    available = sorted({im.get("split") for im in data["images"]})
    unknown = [s for s in wanted if s not in available]
    if unknown:
        raise ValueError(f"split {unknown} not in {json_path}; available splits: {available}")
    entries = [
        (image_root / im.get("filepath", "") / im["filename"], [s["raw"] for s in im["sentences"]], int(im["imgid"]))
        for im in data["images"]
        if im["split"] in wanted
    ]
    if check_files:
        missing = [p for p, _, _ in entries if not p.is_file()]
        if missing:
            raise FileNotFoundError(
                f"{len(missing)} of {len(entries)} images of split {wanted} are missing, e.g. {missing[0]}. {IMAGES_HELP}"
            )
    return entries


class KarpathyDataset(torch.utils.data.Dataset):
    """Images with all their captions: item i is ``(image, [captions], imgid)``.

    The image is a PIL RGB image, or ``transform(image)``. PyTorch's default collate would transpose
    the caption lists; use ``collate_fn=karpathy_collate``.
    """

    def __init__(self, json_path, image_root, split="train", transform=None, check_files: bool = True):
        self.entries = load_karpathy_split(json_path, image_root, split, check_files)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, i: int):
        path, captions, imgid = self.entries[i]
        with Image.open(path) as im:
            image = im.convert("RGB")
        return (image if self.transform is None else self.transform(image)), captions, imgid


def karpathy_collate(batch):
    """``[(image, captions, imgid), ...]`` -> (stacked images if tensors else list, list of caption lists, (B,) ids)."""
    images, captions, ids = zip(*batch)
    if all(isinstance(x, torch.Tensor) for x in images):
        images = torch.stack(images)
    else:
        images = list(images)
    return images, list(captions), torch.tensor(ids, dtype=torch.long)
