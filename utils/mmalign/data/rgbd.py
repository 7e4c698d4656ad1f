r"""Real RGB-D data: a loader for NYU-Depth-v2-style folders and a real depth example shipped in a package.

Expected layout (NYU Depth v2, Silberman et al., ECCV 2012, as exported by most toolkits)::

    root/
      rgb/<stem>.png            8-bit RGB (or .jpg)
      depth/<stem>.png          16-bit single-channel PNG, millimetres (0 = missing)
       or depth/<stem>.npy      float array (H, W), metres
      train.txt, test.txt       one stem per line ('#' comments and blank lines ignored)

or the widely shared CSV export of NYU Depth v2 (as in DenseDepth, Alhashim & Wonka, 2018)::

    root/                       (or root/data/ holding the CSVs)
      data/nyu2_train.csv       lines "data/nyu2_train/<scene>/<n>.jpg,data/nyu2_train/<scene>/<n>.png"
      data/nyu2_test.csv
      data/nyu2_train/<scene>/<n>.jpg, <n>.png   RGB and 16-bit depth PNG (millimetres)

Paths in a CSV are relative to the folder that holds ``data/`` (or to the CSV's folder). Both layouts
get the same checks: missing file, RGB/depth size mismatch, corrupt or 8-bit depth PNG.

Stereo gives depth too: :func:`middlebury_example` returns a Middlebury 2014 pair with ground-truth
disparity shipped in scikit-image, and :func:`disparity_to_depth` converts it,
:math:`Z = f B / (d + d_{offs})`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch.utils.data import Dataset

from .._optional import missing_extra
from ..checks import check_real

LAYOUT = ("root/rgb/<stem>.png, root/depth/<stem>.png (16-bit, millimetres) or root/depth/<stem>.npy (metres), "
          "root/<split>.txt listing one stem per line; or the NYU-Depth-v2 CSV layout root/data/nyu2_<split>.csv "
          "listing 'data/nyu2_<split>/<scene>/<n>.jpg,data/nyu2_<split>/<scene>/<n>.png' pairs")

#: Calibration of ``skimage.data.stereo_motorcycle`` (Middlebury 2014 "Motorcycle", downsampled 4x),
#: from its docstring: focal length in pixels, baseline in metres, principal-point offset in pixels.
MIDDLEBURY_MOTORCYCLE = {"focal": 994.978, "baseline": 0.193001, "doffs": 31.086}


class RGBDDataset(Dataset):
    """Paired RGB images and metric depth maps from a NYU-Depth-v2-style folder.

    Args:
        root: the dataset folder (either layout in the module docstring).
        split: name of the split: ``<split>.txt`` (folder layout) or ``nyu2_<split>.csv`` (CSV layout).
        depth_scale: PNG depth units per metre (1000 for millimetres); ``.npy`` depth is already metres.
        transform: optional ``transform(rgb, depth) -> (rgb, depth)`` applied to both together, so
            crops and flips stay aligned.

    Items: ``(rgb (3, H, W) float32 in [0, 1], depth (1, H, W) float32 metres, stem)``.
    """

    def __init__(self, root: str | Path, split: str = "train", depth_scale: float = 1000.0,
                 transform: Callable | None = None):
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"RGB-D root folder not found: {self.root}. Expected layout: {LAYOUT}")
        if not isinstance(split, str) or not split:
            raise TypeError(f"split must be a split name such as 'train', got {split!r}")
        if transform is not None and not callable(transform):
            raise TypeError(f"transform must be callable (rgb, depth) -> (rgb, depth), got {type(transform).__name__}")
        depth_scale = check_real("depth_scale", depth_scale)
        if depth_scale <= 0:
            raise ValueError(f"depth_scale must be > 0 (1000 for millimetre PNGs), got {depth_scale}")
        self.depth_scale, self.transform = depth_scale, transform
        split_file = self.root / f"{split}.txt"
        csv_file = next((p for p in (self.root / f"nyu2_{split}.csv", self.root / "data" / f"nyu2_{split}.csv")
                         if p.is_file()), None)
        if split_file.is_file():
            self.layout = "folders"
            lines = (ln.strip() for ln in split_file.read_text(encoding="utf-8").splitlines())
            self.stems = [ln for ln in lines if ln and not ln.startswith("#")]
            if not self.stems:
                raise ValueError(f"split file {split_file} lists no stems; write one file stem per line")
            self.files = [(self._find(self.root / "rgb", s, (".png", ".jpg", ".jpeg")),
                           self._find(self.root / "depth", s, (".png", ".npy"))) for s in self.stems]
        elif csv_file is not None:
            self.layout = "nyu2_csv"
            self.files, self.stems = _read_nyu_csv(csv_file)
        else:
            found = sorted(p.name for p in self.root.glob("*.txt")) + sorted(
                str(p.relative_to(self.root)) for p in [*self.root.glob("*.csv"), *self.root.glob("data/*.csv")])
            raise FileNotFoundError(f"split file not found: {split_file} (split files present: {found}); nor "
                                    f"nyu2_{split}.csv. Expected layout: {LAYOUT}")

    @staticmethod
    def _find(folder: Path, stem: str, exts: tuple[str, ...]) -> Path:
        for ext in exts:
            if (folder / f"{stem}{ext}").is_file():
                return folder / f"{stem}{ext}"
        raise FileNotFoundError(f"missing file for stem {stem!r}: none of "
                                f"{[str(folder / (stem + e)) for e in exts]} exists. Expected layout: {LAYOUT}")

    def __len__(self) -> int:
        return len(self.stems)

    def __getitem__(self, i: int):
        rgb_path, depth_path = self.files[i]
        rgb = torch.from_numpy(_read_rgb(rgb_path)).permute(2, 0, 1).float().div_(255.0)
        depth = torch.from_numpy(_read_depth(depth_path, self.depth_scale))[None]
        if rgb.shape[1:] != depth.shape[1:]:
            raise ValueError(f"size mismatch for stem {self.stems[i]!r}: rgb is {tuple(rgb.shape[1:])} but depth is "
                             f"{tuple(depth.shape[1:])} ({rgb_path}, {depth_path}); register/resize them to the same H, W")
        if self.transform is not None:
            rgb, depth = self.transform(rgb, depth)
        return rgb, depth, self.stems[i]


def _read_nyu_csv(csv_file: Path) -> tuple[list[tuple[Path, Path]], list[str]]:
    """``[(rgb path, depth path)]`` and stems (``<scene>/<n>``) from a NYU-Depth-v2 CSV file."""
    import csv

    files, stems = [], []
    bases = (csv_file.parent.parent, csv_file.parent) if csv_file.parent.name == "data" else (csv_file.parent,)
    with open(csv_file, encoding="utf-8", newline="") as f:
        for lineno, row in enumerate(csv.reader(f), 1):
            row = [c.strip() for c in row]
            if not row or not any(row) or row[0].startswith("#"):
                continue
            if len(row) != 2 or not all(row):
                raise ValueError(f"{csv_file}, line {lineno}: expected 'rgb path,depth path', got {row!r}. "
                                 f"Expected layout: {LAYOUT}")
            pair = []
            for rel in row:
                candidates = [base / rel for base in bases]
                found = next((p for p in candidates if p.is_file()), None)
                if found is None:
                    raise FileNotFoundError(f"{csv_file}, line {lineno}: missing file {rel!r} (looked for "
                                            f"{[str(p) for p in candidates]}). Expected layout: {LAYOUT}")
                pair.append(found)
            if pair[1].suffix.lower() not in (".png", ".npy"):
                raise ValueError(f"{csv_file}, line {lineno}: depth file {pair[1]} must be a 16-bit .png (or .npy)")
            files.append((pair[0], pair[1]))
            parts = Path(row[0]).with_suffix("").parts
            stems.append("/".join(parts[-2:]))
    if not files:
        raise ValueError(f"{csv_file} lists no image pairs; write one 'rgb path,depth path' line per frame")
    return files, stems


def _read_rgb(path: Path) -> np.ndarray:
    from PIL import Image

    try:
        with Image.open(path) as im:
            return np.array(im.convert("RGB"), dtype=np.uint8)  # a writable copy
    except FileNotFoundError:
        raise FileNotFoundError(f"RGB image {path} is missing. Expected layout: {LAYOUT}") from None
    except Exception as err:  # truncated or not an image
        raise ValueError(f"{path}: RGB image cannot be decoded ({type(err).__name__}: {err}); the file is "
                         "truncated or damaged") from None


def _read_depth(path: Path, depth_scale: float) -> np.ndarray:
    """(H, W) float32 metres from a 16-bit millimetre PNG or a metre .npy."""
    if path.suffix == ".npy":
        try:
            d = np.load(path)
        except Exception as err:
            raise ValueError(f"{path}: depth .npy cannot be read ({type(err).__name__}: {err}); the file is truncated "
                             "or damaged") from None
        if d.ndim == 3 and 1 in (d.shape[0], d.shape[-1]):
            d = d.reshape(d.shape[1:] if d.shape[0] == 1 else d.shape[:-1])
        if d.ndim != 2 or not np.issubdtype(d.dtype, np.number):
            raise ValueError(f"{path}: depth .npy must be a numeric (H, W) array in metres, got {d.dtype} {d.shape}")
        return d.astype(np.float32)
    from PIL import Image

    try:
        with Image.open(path) as im:
            mode, bands = im.mode, len(im.getbands())
            if mode in ("I;16", "I;16B", "I;16L", "I"):
                d = np.asarray(im).astype(np.float32)
    except FileNotFoundError:
        raise FileNotFoundError(f"depth map {path} is missing. Expected layout: {LAYOUT}") from None
    except Exception as err:  # truncated or not a PNG
        raise ValueError(f"{path}: depth PNG cannot be decoded ({type(err).__name__}: {err}); the file is truncated "
                         "or damaged") from None
    if mode not in ("I;16", "I;16B", "I;16L", "I"):
        raise ValueError(f"{path}: depth PNG must be single-channel 16-bit (millimetres), got mode {mode!r} "
                         f"with {bands} channel(s); a colour or 8-bit depth picture is a visualisation, "
                         "not metric depth. Save uint16 millimetres, or float metres as .npy")
    return d / np.float32(depth_scale)


def middlebury_example() -> tuple[np.ndarray, np.ndarray]:
    """A real stereo frame with ground-truth disparity, shipped in scikit-image (no download).

    Middlebury 2014 "Motorcycle" (Scharstein et al., GCPR 2014), downsampled 4x. Convert with
    ``disparity_to_depth(disp, **MIDDLEBURY_MOTORCYCLE)``.

    Returns:
        ``(left, disparity)``: left image (500, 741, 3) uint8 and disparity (500, 741) float32 in
        pixels, ``inf``/NaN where there is no ground truth.
    """
    try:
        from skimage.data import stereo_motorcycle
    except ModuleNotFoundError as e:
        raise missing_extra(e, "data", "mmalign.data.rgbd.middlebury_example") from e
    left, _, disp = stereo_motorcycle()
    return left, disp.astype(np.float32)


def disparity_to_depth(disp, focal: float, baseline: float, doffs: float = 0.0, invalid_value: float = 0.0):
    r"""Depth from stereo disparity, with invalid disparities marked.

    .. math:: Z = \frac{f\,B}{d + d_{offs}}\quad\text{where } d \text{ is finite and } > 0,\ \text{else } Z = \text{invalid\_value}

    Args:
        disp: disparity in pixels, any shape, torch tensor or numpy array.
        focal: focal length in pixels; baseline: camera distance (the unit of the result, e.g. metres);
        doffs: x-offset of the two principal points in pixels (Middlebury's ``doffs``, 0 if rectified
            with the same principal point); invalid_value: depth written where disparity is 0, negative,
            inf or NaN (0, the NYU convention for missing depth).

    Returns:
        Depth of the same shape and kind (tensor or array) as ``disp``, float32.
    """
    focal, baseline, doffs = check_real("focal", focal), check_real("baseline", baseline), check_real("doffs", doffs)
    if focal <= 0 or baseline <= 0:
        raise ValueError(f"focal and baseline must be > 0, got focal={focal}, baseline={baseline}")
    is_numpy = isinstance(disp, np.ndarray)
    d = torch.as_tensor(disp).float()
    valid = torch.isfinite(d) & (d > 0) & (d + doffs > 0)
    z = torch.where(valid, focal * baseline / torch.where(valid, d + doffs, 1.0), invalid_value)
    return z.numpy() if is_numpy else z
