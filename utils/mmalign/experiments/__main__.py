"""python -m mmalign.experiments CHAPTER [--profile full]: run and write a chapter's reference table."""

import argparse
import time

import torch

from ..config import load_config
from . import CHAPTERS, run_chapter, write_results

parser = argparse.ArgumentParser(description=__doc__)
parser.add_argument("chapter", choices=sorted(CHAPTERS))
parser.add_argument("--profile", default=None, help="ci | full | gpu (default: MMALIGN_PROFILE, else ci)")
args = parser.parse_args()
cfg = load_config(args.profile)
torch.set_num_threads(cfg.num_threads or torch.get_num_threads())
start = time.perf_counter()
result = run_chapter(args.chapter, cfg)
path = write_results(args.chapter, result, cfg, time.perf_counter() - start)
print(f"wrote {path} ({cfg.profile} profile, {time.perf_counter() - start:.0f} s)")
