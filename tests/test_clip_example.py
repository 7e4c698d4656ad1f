"""examples/clip_torchrun.py, the library outside the course: a CLIP-style run under torchrun (2 gloo
processes) with a learned temperature, mined negatives and a gathered queue equals the 1-process run, and
an interrupted run resumes to the same weights bit for bit."""

import json
import os
import runpy
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "clip_torchrun.py"


def _main():
    return runpy.run_path(str(EXAMPLE))["main"]


def _weights(folder: Path) -> dict:
    return torch.load(folder / "final_weights.pt", weights_only=True)


def test_one_process_trains_and_resumes_bit_identically(tmp_path):
    main = _main()
    full = main(["--out", str(tmp_path / "full")])
    assert full["last_loss"] < 0.5 * full["first_loss"] and full["t2i_R@1"] > 20 / 512 and full["queue"] == 128
    main(["--out", str(tmp_path / "cut"), "--max-steps", "10"])
    resumed = main(["--out", str(tmp_path / "cut")])
    assert resumed == full
    a, b = _weights(tmp_path / "full"), _weights(tmp_path / "cut")
    assert set(a) == set(b) and "temperature.log_scale" in a
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_two_processes_equal_one_process_through_an_interruption(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(EXAMPLE),
           "--out", str(tmp_path / "two")]
    for extra in (["--max-steps", "10"], []):  # interrupted after 10 steps, then resumed
        done = subprocess.run(cmd + extra, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
    two = json.loads((tmp_path / "two" / "result.json").read_text())
    one = _main()(["--out", str(tmp_path / "one")])
    assert two["world_size"] == 2 and two["steps"] == one["steps"]
    a, b = _weights(tmp_path / "one"), _weights(tmp_path / "two")
    for k in a:  # float32 sums in another order: equal to rounding
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6)
    assert abs(two["tau"] - one["tau"]) < 1e-6 and two["tau"] != 0.1  # the temperature trained, the same on both
