"""`dskc compile --out DIR` ships every kernel the runtime launches for its token counts: the compiled tiny model's
real launches (a prefill and decode steps hitting each planned bucket, recorded under the interpreter), replayed
through the ahead-of-time hook with Triton's own binder for sm_90 (tests/compiler/_aot_replay.py, no interpreter),
are all served by shipped cubins: 0 compiled here.

The DIR is written from the plan the CPU run uses (runs_on="cpu": bf16 dot operands run as fp16 under the
interpreter, so those kernels are the fp16 variants); `dskc compile` plans for the GPU, where the same code path
ships the bf16 ones (the GPU test in test_aot_load.py runs that natively).
"""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from dskc import compiler, knobs
from dskc.build import aot
from dskc.model import Transformer, get_config, init_random

from _launches import record, steps

REPLAY = Path(__file__).with_name("_aot_replay.py")


def _replay(out: Path, launches: list, tmp_path: Path) -> dict:
    path = tmp_path / "launches.json"
    path.write_text(json.dumps(launches))
    proc = subprocess.run([sys.executable, str(REPLAY), str(out), str(path)], capture_output=True, text=True,
                          env=knobs.subprocess_env(interpret=False), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def tiny():
    cfg = get_config("tiny")
    model = Transformer(cfg)
    init_random(model, seed=0)
    return cfg, model


def _ship(tiny, tokens, out):
    cfg, model = tiny
    p = compiler.plan(model, "sm90a", runs_on="cpu", tokens=tokens)
    compiler.build(p, progress=False)
    aot.write(p, out, aot.config_dict(cfg))


def test_every_real_launch_is_served_by_a_shipped_kernel(tiny, tmp_path):
    cfg, model = tiny
    out = tmp_path / "tiny"
    _ship(tiny, (1, 16), out)
    compiled = compiler.compile(model, "sm90a", build_kernels=False, progress=False, tokens=(1, 16))
    with record() as rec:
        steps(compiled, [(1, 1), (2, 5)], cfg.vocab_size)     # rows 1 and 10 (bucket 16), decodes of 1 and 2
    assert {b for _, _, b, _, _ in rec.lookups} == {1, 16}
    launches = list({json.dumps(k, sort_keys=True): k for k in rec.kernels}.values())
    res = _replay(out, launches, tmp_path)
    assert res["serving"], res["reason"]
    assert res["compiled_here"] == 0 and res["served"] == len(launches), (res["not_shipped"], res["misses"])
    # the replay does catch a miss: a DIR shipped for one token only lacks the 16-token configs
    one = tmp_path / "one"
    _ship(tiny, (1,), one)
    res = _replay(one, launches, tmp_path)
    assert res["compiled_here"] > 0 and res["served"] + res["compiled_here"] == len(launches), res
