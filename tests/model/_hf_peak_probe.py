"""Peak resident memory of dskc.model.from_pretrained on a checkpoint folder, in a process of its own.

Usage: python _hf_peak_probe.py FOLDER. Prints one JSON line: the parameter bytes of the loaded model and the rise
of the peak resident set (VmHWM, reset through /proc/self/clear_refs just before the load) over the resident set
before it, in bytes.
"""
import json
import re
import sys

import torch

from dskc.model import from_pretrained


def _kib(field: str) -> int:
    return int(re.search(field + r":\s+(\d+) kB", open("/proc/self/status").read()).group(1))


def main(folder: str) -> None:
    torch.set_num_threads(1)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")   # VmHWM := VmRSS
    before = _kib("VmRSS")
    model = from_pretrained(folder, dtype=torch.float32, max_seq_len=16, max_batch_size=1)
    peak = _kib("VmHWM")
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    print(json.dumps({"param_bytes": params, "peak_rise_bytes": (peak - before) * 1024}))


if __name__ == "__main__":
    main(sys.argv[1])
