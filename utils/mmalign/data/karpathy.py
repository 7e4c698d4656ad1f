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

from .._optional import missing_extra

try:
    from PIL import Image
except ModuleNotFoundError as e:
    raise missing_extra(e, "data", "mmalign.data.karpathy") from e

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
    try:
        with open(json_path, encoding="utf-8") as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{json_path} is not valid JSON ({err}); the file is truncated or damaged: download and "
                         f"unzip the Karpathy splits again ({SPLITS_URL})") from None
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise ValueError(f"{json_path} is not a Karpathy split file: expected a JSON object with an 'images' list")
    if not (isinstance(split, str) or (isinstance(split, (tuple, list)) and split
                                       and all(isinstance(s, str) for s in split))):
        raise TypeError(f"split must be a split name or a tuple of them, e.g. ('train', 'restval'), got {split!r}")
    for i, im in enumerate(data["images"]):
        _check_image_entry(json_path, i, im)
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


def _check_image_entry(json_path: Path, i: int, im) -> None:
    """Entry ``i`` of the 'images' list has the fields this loader reads, with the right types."""
    where = f"{json_path}: images[{i}]"
    if not isinstance(im, dict):
        raise ValueError(f"{where} is a {type(im).__name__}, not an object; is this a Karpathy split file?")
    missing = [k for k in ("filename", "split", "sentences", "imgid") if k not in im]
    if missing:
        raise ValueError(f"{where} lacks the field(s) {missing} (it has {sorted(im)}); a Karpathy split entry has "
                         "filename, split, sentences and imgid: download the split file again")
    if not isinstance(im["sentences"], list) or not all(isinstance(s, dict) and isinstance(s.get("raw"), str)
                                                        for s in im["sentences"]):
        raise ValueError(f"{where}: 'sentences' must be a list of objects with a 'raw' caption string")
    if not isinstance(im["filename"], str) or not isinstance(im.get("filepath", ""), str):
        raise ValueError(f"{where}: 'filename' (and 'filepath') must be strings")
    if isinstance(im["imgid"], bool) or not isinstance(im["imgid"], int):
        raise ValueError(f"{where}: 'imgid' must be an integer, got {im['imgid']!r}")


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
        try:
            with Image.open(path) as im:
                image = im.convert("RGB")
        except FileNotFoundError:
            raise FileNotFoundError(f"image {path} (item {i}) is missing. {IMAGES_HELP}") from None
        except Exception as err:  # truncated or not an image: PIL raises OSError, UnidentifiedImageError...
            raise ValueError(f"image {path} (item {i}) cannot be decoded ({type(err).__name__}: {err}); the file is "
                             "truncated or damaged: download it again") from None
        return (image if self.transform is None else self.transform(image)), captions, imgid


def karpathy_collate(batch):
    """``[(image, captions, imgid), ...]`` -> (stacked images if tensors else list, list of caption lists, (B,) ids)."""
    if not isinstance(batch, (list, tuple)) or not batch:
        raise ValueError(f"karpathy_collate expects a non-empty list of (image, captions, imgid) items, got {batch!r:.80}")
    for j, item in enumerate(batch):
        if not isinstance(item, (tuple, list)) or len(item) != 3:
            raise ValueError(f"karpathy_collate: item {j} must be (image, [captions], imgid) as KarpathyDataset "
                             f"returns, got {type(item).__name__} {item!r:.80}")
        if not isinstance(item[1], (list, tuple)) or not all(isinstance(c, str) for c in item[1]):
            raise ValueError(f"karpathy_collate: item {j}'s captions must be a list of strings, got {item[1]!r:.80}")
        if isinstance(item[2], bool) or not isinstance(item[2], int):
            raise ValueError(f"karpathy_collate: item {j}'s imgid must be an integer, got {item[2]!r}")
    images, captions, ids = zip(*batch)
    shapes = {tuple(x.shape) for x in images if isinstance(x, torch.Tensor)}
    if len(shapes) > 1:
        raise ValueError(f"karpathy_collate: image tensors have different shapes {sorted(shapes)}; resize them to one "
                         "size in the transform (e.g. torchvision Resize + CenterCrop)")
    if all(isinstance(x, torch.Tensor) for x in images):
        images = torch.stack(images)
    else:
        images = list(images)
    return images, list(captions), torch.tensor(ids, dtype=torch.long)
