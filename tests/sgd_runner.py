# Run by tests/test_distributed.py (not collected by pytest):
#   torchrun --nproc_per_node N tests/sgd_runner.py SCRIPT [FLAGS ...]
# runs SCRIPT as `python SCRIPT FLAGS` would, with AdamW replaced by plain SGD: the saved weights are then the start
# minus lr times the (clipped) gradients, so equal weights mean equal gradients. Adam would not do for the comparison:
# a gradient that is 0 in exact arithmetic (GPT-2's attention key bias, a dead unit) is rounding noise, which
# g / sqrt(v) blows up to a step of size lr, differently in each run.
import runpy
import sys
from pathlib import Path

import torch


def sgd(parameters, lr, weight_decay=0.0, **unused):
    return torch.optim.SGD(parameters, lr=lr, weight_decay=weight_decay)


torch.optim.AdamW = sgd
script, sys.argv = sys.argv[1], sys.argv[1:]
sys.path.insert(0, str(Path(script).resolve().parent))
runpy.run_path(script, run_name="__main__")
