"""GPU timing of one trial (timing mode "cuda-graph"): only this module touches a GPU. Not run on CPU-only hosts.

Each trial runs in a spawned child process with a timeout, so a config that crashes (illegal address, launch
failure) or hangs is killed and scored FAIL, never selected, and the parent's CUDA context stays clean.
In the child: the stem's runner builds inputs (with realistic MoE routing when given), the config's output is
checked against the runner's reference, then the kernel is captured once in a CUDA graph and replayed `reps`
times, each replay timed with CUDA events after an L2 flush (a 256 MiB buffer zeroed); the median is the value.
Graph replay removes Python launch overhead, which matters most for decode-sized problems.

Runner contract (a stem module's `runner` function, or "runner": "module:function" in autotune/spaces/<stem>.json):
    runner(problem: dict, config: dict, device: str, routing: dict | None) -> dict with
        "launch":    () -> None           launches the kernel(s) under test on the current stream
        "output":    () -> Tensor         the result of the last launch
        "reference": () -> Tensor         a plain-PyTorch reference (higher precision)
        "min_cos":   float (optional)     cosine similarity needed (default 0.999)
"""
from __future__ import annotations

import dataclasses
import importlib
import multiprocessing as mp
import statistics

from dskc.autotune.objective import TrialFailed

MODE = "cuda-graph"


@dataclasses.dataclass(frozen=True)
class GpuTimer:
    gpu_name: str
    reps: int = 50
    timeout_s: float = 120.0
    routing: dict | None = None       # {"ids": [[...]], "signature": str} from dskc.autotune.routing
    mode: str = MODE
    verification: str = "output checked against the runner's reference (cosine similarity) before timing"

    @staticmethod
    def create(**kw) -> "GpuTimer":
        import torch
        if not torch.cuda.is_available():
            raise RuntimeError("timing 'gpu' needs a CUDA GPU and none is visible; use timing 'model' (an estimate)")
        return GpuTimer(torch.cuda.get_device_name(), **kw)

    def measure(self, space, problem, config, reports, arch) -> tuple[float, dict]:
        runner = space.data.get("runner")
        if not runner and callable(getattr(space.module, "runner", None)):
            runner = f"{space.module.__name__}:runner"
        if not runner:
            raise TrialFailed(f"run: stem {space.stem!r} has no GPU runner (a `runner` function or \"runner\" data)")
        ctx = mp.get_context("spawn")
        queue = ctx.Queue()
        proc = ctx.Process(target=_child, args=(runner, problem, config, self.reps, self.routing, queue))
        proc.start()
        proc.join(self.timeout_s)
        if proc.is_alive():
            proc.kill()
            proc.join()
            raise TrialFailed(f"run: hung (killed after {self.timeout_s:.0f} s)")
        if proc.exitcode != 0 or queue.empty():
            raise TrialFailed(f"run: crashed (exit code {proc.exitcode})")
        result = queue.get()
        if "error" in result:
            raise TrialFailed(f"run: {result['error']}")
        return result["median_s"], {"times_s": result["times_s"][:10], "cos": result["cos"]}


def _child(runner: str, problem, config, reps, routing, queue) -> None:
    try:
        queue.put(_time(runner, problem, config, reps, routing))
    except Exception as exc:  # reported to the parent as a FAIL with the reason
        queue.put({"error": f"{type(exc).__name__}: {exc}"[:500]})


def _time(runner: str, problem, config, reps, routing) -> dict:
    import torch
    mod_name, fn_name = runner.split(":")
    parts = getattr(importlib.import_module(mod_name), fn_name)(problem, config, "cuda", routing)
    parts["launch"]()
    torch.cuda.synchronize()
    out, ref = parts["output"]().double().flatten(), parts["reference"]().double().flatten()
    cos = float(torch.nn.functional.cosine_similarity(out, ref, dim=0)) if out.numel() else 1.0
    if not torch.isfinite(out).all() or cos < parts.get("min_cos", 0.999):
        return {"error": f"wrong output: cosine similarity {cos:.5f} to the reference"}
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        parts["launch"]()                       # warm-up on the capture stream
        with torch.cuda.graph(graph, stream=stream):
            parts["launch"]()
    flush = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")
    times = []
    for _ in range(reps):
        flush.zero_()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e-3)
    return {"median_s": statistics.median(times), "times_s": times, "cos": cos}
