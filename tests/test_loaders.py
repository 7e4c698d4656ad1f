"""WIT and Karpathy-split loaders on tiny fixtures built here in the real formats."""

import base64
import gzip
import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from mmalign.data.karpathy import KarpathyDataset, karpathy_collate, load_karpathy_split
from mmalign.data.wit import WitDataset, WitRecord, read_wit_records, write_wit_records


def make_record(i, language="en", dim=2048):
    img = Image.new("RGB", (8 + i, 6), color=(10 * i, 200, 30))
    emb = np.random.default_rng(i).standard_normal(dim).astype(np.float32)
    return WitRecord(img, f"caption {i}", language, emb, f"https://upload.wikimedia.org/img{i}.png")


def png_b64(color=(1, 2, 3)):
    buf = io.BytesIO()
    Image.new("RGB", (4, 4), color).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def raw(**overrides):
    """A valid raw WIT line as a dict, with fields overridden."""
    r = {
        "image_url": "u",
        "wit_features": [{"language": "fr", "caption_reference_description": "une image"},
                         {"language": "en", "caption_reference_description": "an image"}],
        "b64_bytes": png_b64(),
        "embedding": ",".join(["0.5"] * 2048),
    }
    r.update(overrides)
    return r


# --------------------------------------------------------------------------------------------- WIT


def test_wit_round_trip(tmp_path):
    path = tmp_path / "part-00000.json.gz"
    recs = [make_record(i) for i in range(3)]
    write_wit_records(path, recs)
    with gzip.open(path, "rt") as f:  # the real format on disk
        line = json.loads(f.readline())
    assert set(line) >= {"image_url", "wit_features", "b64_bytes", "embedding"}
    assert isinstance(line["embedding"], str) and len(line["embedding"].split(",")) == 2048
    got, stats = read_wit_records(path)
    assert stats.lines == 3 and stats.kept == 3 and not stats.skipped
    for r, g in zip(recs, got):
        assert g.caption == r.caption and g.language == "en" and g.image_url == r.image_url
        assert g.image.size == r.image.size and np.array_equal(np.asarray(g.image), np.asarray(r.image))
        assert g.embedding.dtype == np.float32 and np.allclose(g.embedding, r.embedding, rtol=1e-5, atol=1e-6)


def test_wit_language_selection(tmp_path):
    path = tmp_path / "w.json.gz"
    write_wit_records(path, [raw(), raw(wit_features=[{"language": "de", "caption_reference_description": "x"}]),
                             raw(wit_features=[{"language": "en", "caption_reference_description": None}])])
    recs, stats = read_wit_records(path, language="en", on_error="raise")  # a filter never raises
    assert [r.caption for r in recs] == ["an image"] and stats.skipped["no_caption"] == 2 and stats.corrupt == 0
    recs, _ = read_wit_records(path, language="fr")
    assert [r.caption for r in recs] == ["une image"]
    recs, _ = read_wit_records(path, language=None)
    assert [r.caption for r in recs] == ["une image", "x"]


CORRUPT = {
    "bad_base64": lambda: raw(b64_bytes="not base64 !!"),
    "bad_image": lambda: raw(b64_bytes=base64.b64encode(b"GIF89a garbage").decode()),
    "missing_field": lambda: {k: v for k, v in raw().items() if k != "b64_bytes"},
    "bad_embedding": lambda: raw(embedding="1.0,2.0,3.0"),
}


def test_wit_corrupt_records_are_counted(tmp_path):
    path = tmp_path / "w.json.gz"
    lines = [raw()] + [make() for make in CORRUPT.values()] + [raw(embedding="a," * 2047 + "b"), raw()]
    write_wit_records(path, lines)
    with gzip.open(path, "at") as f:
        f.write("{not json\n")
    recs, stats = read_wit_records(path)
    assert len(recs) == 2 and stats.lines == 8 and stats.kept == 2
    assert stats.skipped == {"bad_base64": 1, "bad_image": 1, "missing_field": 1, "bad_embedding": 2, "bad_json": 1}
    assert stats.corrupt == 6


@pytest.mark.parametrize("reason", sorted(CORRUPT))
def test_wit_corrupt_record_raises_with_file_line_reason(tmp_path, reason):
    path = tmp_path / "w.json.gz"
    write_wit_records(path, [raw(), raw(), CORRUPT[reason]()])
    with pytest.raises(ValueError, match=rf"w\.json\.gz, line 3: {reason}"):
        read_wit_records(path, on_error="raise")


def test_wit_truncated_gzip(tmp_path):
    path = tmp_path / "w.json.gz"
    write_wit_records(path, [make_record(i) for i in range(40)])
    data = path.read_bytes()
    cut = tmp_path / "cut.json.gz"
    cut.write_bytes(data[: len(data) // 2])
    recs, stats = read_wit_records(cut)
    assert stats.skipped["truncated_gzip"] == 1 and 0 < len(recs) < 40
    assert [r.caption for r in recs] == [f"caption {i}" for i in range(len(recs))]
    with pytest.raises(ValueError, match=r"cut\.json\.gz.*truncated_gzip"):
        read_wit_records(cut, on_error="raise")


def test_wit_limit_dataset_and_errors(tmp_path):
    path = tmp_path / "w.json.gz"
    write_wit_records(path, [make_record(i) for i in range(5)])
    recs, stats = read_wit_records(path, limit=2)
    assert len(recs) == 2 and stats.kept == 2
    ds = WitDataset(path, transform=lambda im: torch.tensor(im.size))
    assert len(ds) == 5 and ds.stats.kept == 5
    image, caption, item = ds[3]
    assert torch.equal(image, torch.tensor([11, 6])) and caption == "caption 3" and item == 3
    assert ds.embeddings.shape == (5, 2048) and ds.embeddings.dtype == torch.float32
    ds2 = WitDataset(recs)
    assert isinstance(ds2[0][0], Image.Image) and ds2.stats is None
    with pytest.raises(FileNotFoundError, match="caption_competition"):
        read_wit_records(tmp_path / "missing.json.gz")
    with pytest.raises(ValueError, match="on_error"):
        read_wit_records(path, on_error="ignore")


# ---------------------------------------------------------------------------------------- Karpathy


def make_karpathy(tmp_path, coco=True):
    root = tmp_path / "images"
    images = []
    for i, split in enumerate(["train", "train", "val", "test", "restval"]):
        folder = ("val2014" if split != "train" else "train2014") if coco else ""
        name = f"COCO_{folder}_{i:012d}.jpg" if coco else f"{1000 + i}_abc.jpg"
        (root / folder).mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (10, 7 + i), (i, i, i)).save(root / folder / name)
        entry = {"filename": name, "imgid": i, "split": split, "sentid": [2 * i, 2 * i + 1],
                 "sentences": [{"raw": f"img {i} cap {k}", "tokens": ["img", str(i)], "imgid": i, "sentid": 2 * i + k}
                               for k in range(2)]}
        if coco:
            entry["filepath"] = folder
        images.append(entry)
    js = tmp_path / ("dataset_coco.json" if coco else "dataset_flickr8k.json")
    js.write_text(json.dumps({"images": images, "dataset": "coco" if coco else "flickr8k"}))
    return js, root


@pytest.mark.parametrize("coco", [True, False])
def test_karpathy_splits(tmp_path, coco):
    js, root = make_karpathy(tmp_path, coco)
    train = load_karpathy_split(js, root, "train")
    assert [e[2] for e in train] == [0, 1]
    path, caps, imgid = train[1]
    assert path.is_file() and caps == ["img 1 cap 0", "img 1 cap 1"] and imgid == 1
    if coco:
        assert path.parent.name == "train2014"
    assert [e[2] for e in load_karpathy_split(js, root, ("train", "restval"))] == [0, 1, 4]
    assert [e[2] for e in load_karpathy_split(js, root, "test")] == [3]


def test_karpathy_dataset_and_collate(tmp_path):
    js, root = make_karpathy(tmp_path)
    ds = KarpathyDataset(js, root, "train", transform=lambda im: torch.zeros(3, im.size[1], 2))
    image, caps, imgid = ds[1]
    assert image.shape == (3, 8, 2) and caps[1] == "img 1 cap 1" and imgid == 1
    raw_ds = KarpathyDataset(js, root, ("val", "test"))
    assert isinstance(raw_ds[0][0], Image.Image) and raw_ds[0][0].mode == "RGB"
    loader = torch.utils.data.DataLoader(raw_ds, batch_size=2, collate_fn=karpathy_collate)
    images, captions, ids = next(iter(loader))
    assert len(images) == 2 and captions[1] == ["img 3 cap 0", "img 3 cap 1"] and torch.equal(ids, torch.tensor([2, 3]))


def test_karpathy_missing_files(tmp_path):
    js, root = make_karpathy(tmp_path)
    with pytest.raises(FileNotFoundError, match="caption_datasets.zip"):
        load_karpathy_split(tmp_path / "nope.json", root)
    with pytest.raises(FileNotFoundError, match="cocodataset.org"):
        load_karpathy_split(js, tmp_path / "no_images")
    (root / "val2014" / "COCO_val2014_000000000002.jpg").unlink()  # the only val image
    with pytest.raises(FileNotFoundError, match="1 of 1 images"):
        load_karpathy_split(js, root, "val")
    assert len(load_karpathy_split(js, root, "val", check_files=False)) == 1
    with pytest.raises(ValueError, match="available splits"):
        load_karpathy_split(js, root, "dev")
    bad = tmp_path / "bad.json"
    bad.write_text("[]")
    with pytest.raises(ValueError, match="not a Karpathy split file"):
        load_karpathy_split(bad, root)
