"""RGB-D loader on a fixture folder in the real NYU-style layout, and the Middlebury stereo example."""

import numpy as np
import pytest
import torch
from PIL import Image

from mmalign.data.rgbd import MIDDLEBURY_MOTORCYCLE, RGBDDataset, disparity_to_depth, middlebury_example

H, W = 6, 8


@pytest.fixture
def rgbd_root(tmp_path):
    """rgb/a.png + depth/a.png (uint16 mm), rgb/b.png + depth/b.npy (metres), train/test splits."""
    rng = np.random.default_rng(0)
    (tmp_path / "rgb").mkdir()
    (tmp_path / "depth").mkdir()
    rgb = {s: rng.integers(0, 256, (H, W, 3), dtype=np.uint8) for s in "ab"}
    for s, arr in rgb.items():
        Image.fromarray(arr).save(tmp_path / "rgb" / f"{s}.png")
    mm = rng.integers(0, 10000, (H, W)).astype(np.uint16)
    mm[0, 0] = 65535  # the full 16-bit range survives
    Image.fromarray(mm).save(tmp_path / "depth" / "a.png")
    metres = rng.uniform(0.5, 8.0, (H, W)).astype(np.float32)
    np.save(tmp_path / "depth" / "b.npy", metres)
    (tmp_path / "train.txt").write_text("# stems\na\n\nb\n")
    (tmp_path / "test.txt").write_text("b\n")
    return tmp_path, rgb, mm, metres


def test_loads_values_in_real_layout(rgbd_root):
    root, rgb, mm, metres = rgbd_root
    ds = RGBDDataset(root, "train")
    assert len(ds) == 2 and ds.stems == ["a", "b"]
    x, d, stem = ds[0]
    assert stem == "a" and x.shape == (3, H, W) and d.shape == (1, H, W)
    assert x.dtype == torch.float32 and d.dtype == torch.float32
    np.testing.assert_allclose(x.permute(1, 2, 0).numpy() * 255, rgb["a"], atol=1e-4)
    np.testing.assert_allclose(d[0].numpy(), mm / 1000.0, rtol=1e-6)
    assert d[0, 0, 0] == pytest.approx(65.535)
    x, d, stem = ds[1]
    np.testing.assert_allclose(d[0].numpy(), metres)  # .npy is metres: no depth_scale
    np.testing.assert_allclose(x.permute(1, 2, 0).numpy() * 255, rgb["b"], atol=1e-4)
    # depth_scale and the joint transform
    d_cm = RGBDDataset(root, "train", depth_scale=100.0)[0][1]
    np.testing.assert_allclose(d_cm[0].numpy(), mm / 100.0, rtol=1e-6)
    flip = RGBDDataset(root, "test", transform=lambda r, d: (r.flip(-1), d.flip(-1)))
    np.testing.assert_allclose(flip[0][1][0].numpy(), metres[:, ::-1])
    loader = torch.utils.data.DataLoader(RGBDDataset(root, "train"), batch_size=2)
    xb, db, stems = next(iter(loader))
    assert xb.shape == (2, 3, H, W) and db.shape == (2, 1, H, W) and list(stems) == ["a", "b"]


def test_missing_root_split_and_file(rgbd_root, tmp_path_factory):
    root = rgbd_root[0]
    with pytest.raises(FileNotFoundError, match="root folder not found.*Expected layout"):
        RGBDDataset(root / "nope", "train")
    with pytest.raises(FileNotFoundError, match=r"split file not found: .*val\.txt.*test\.txt"):
        RGBDDataset(root, "val")
    (root / "depth" / "b.npy").unlink()
    with pytest.raises(FileNotFoundError, match=r"missing file for stem 'b'.*b\.npy"):
        RGBDDataset(root, "test")
    (root / "empty.txt").write_text("# nothing\n")
    with pytest.raises(ValueError, match="lists no stems"):
        RGBDDataset(root, "empty")


def test_malformed_depth(rgbd_root):
    root = rgbd_root[0]
    Image.fromarray(np.zeros((H, W, 3), np.uint8)).save(root / "depth" / "a.png")  # a colour picture
    with pytest.raises(ValueError, match="single-channel 16-bit.*3 channel"):
        RGBDDataset(root, "train")[0]
    Image.fromarray(np.zeros((H, W), np.uint8)).save(root / "depth" / "a.png")  # 8-bit
    with pytest.raises(ValueError, match="single-channel 16-bit"):
        RGBDDataset(root, "train")[0]
    np.save(root / "depth" / "b.npy", np.zeros((3, H, W), np.float32))
    with pytest.raises(ValueError, match=r"numeric \(H, W\) array"):
        RGBDDataset(root, "test")[0]
    np.save(root / "depth" / "b.npy", np.zeros((H, W - 1), np.float32))
    with pytest.raises(ValueError, match="size mismatch for stem 'b'"):
        RGBDDataset(root, "test")[0]
    np.save(root / "depth" / "b.npy", np.ones((1, H, W), np.float32))  # (1, H, W) is accepted
    assert RGBDDataset(root, "test")[0][1].shape == (1, H, W)


def test_disparity_to_depth_handles_invalid():
    disp = torch.tensor([[10.0, 0.0], [float("inf"), float("nan")], [-2.0, 5.0]])
    z = disparity_to_depth(disp, focal=100.0, baseline=0.5)
    torch.testing.assert_close(z, torch.tensor([[5.0, 0.0], [0.0, 0.0], [0.0, 10.0]]))
    z2 = disparity_to_depth(disp.numpy(), focal=100.0, baseline=0.5, doffs=10.0, invalid_value=-1.0)
    assert isinstance(z2, np.ndarray)
    np.testing.assert_allclose(z2, [[2.5, -1.0], [-1.0, -1.0], [-1.0, 50.0 / 15.0]], rtol=1e-6)
    with pytest.raises(ValueError, match="must be > 0"):
        disparity_to_depth(disp, focal=0.0, baseline=0.5)


def test_middlebury_example_is_real_depth():
    pytest.importorskip("skimage")
    left, disp = middlebury_example()
    assert left.shape == (500, 741, 3) and left.dtype == np.uint8
    assert disp.shape == (500, 741) and disp.dtype == np.float32
    valid = np.isfinite(disp) & (disp > 0)
    assert valid.mean() > 0.8 and (~valid).any()  # mostly ground truth, some holes
    z = disparity_to_depth(disp, **MIDDLEBURY_MOTORCYCLE)
    assert np.isfinite(z).all() and (z[~valid] == 0).all()
    # a motorcycle a few metres from the camera: plausible metric depth
    assert 1.0 < np.median(z[valid]) < 5.0
