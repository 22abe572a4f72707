"""Decode steps replayed from CUDA graphs.

A decode step (one new token per sequence) launches dozens of small kernels; on a GPU their launch overhead is
most of the step. `DecodeGraphs` captures the compiled model's decode step once per batch size into a CUDA graph
and replays it. To be replayable, the step must not depend on host values: positions live in a device tensor
(KernelMLA takes `start_pos` as an int32 [batch] tensor: rope rows, cache slots and sequence lengths come from
it), and the ops skip their device-reading input checks while a graph is being captured (positions are checked
on the host here instead).

Capture writes one throwaway cache row per sequence at the last position (max_seq_len - 1): a later step at that
position writes it before reading it, and no earlier step reads it, so capture cannot change any result.
On a CPU (the interpreter) there is nothing to capture: the same device-position step runs directly, which is
how tests check it against the model's own forward.
"""
from __future__ import annotations

import logging

import torch
import torch.nn as nn

log = logging.getLogger("dskc.runtime.graphs")


def step_owner(model: nn.Module):
    """The KernelMLA that computes the step's shared state (the share_step_state pass's owner), or the first."""
    from dskc.runtime.mla import KernelMLA

    mlas = [m for m in model.modules() if isinstance(m, KernelMLA)]
    if not mlas:
        raise ValueError("a decode step on device positions needs the MLA regions on dskc kernels (KernelMLA)")
    return next((m for m in mlas if m.owns_step), mlas[0])


def decode_step(model: nn.Module, tokens: torch.Tensor, positions: torch.Tensor, validate=None) -> torch.Tensor:
    """The Transformer's forward for one token per sequence at device `positions` (int32 [batch]); float32
    logits [batch, vocab]. `model` is the compiled module (its MLA regions are KernelMLA).

    The step's MLA state (rope rows, cache slots, sequence lengths, split schedule) is computed once, here, and
    passed to every layer in place of start_pos. validate: the positions are checked once per step (one sync)
    unless False or a CUDA graph is being captured; the layers never check again."""
    from dskc.runtime.mla import check_positions

    owner = step_owner(model)
    if tuple(positions.shape) != (tokens.shape[0],) or positions.dtype != torch.int32 or tokens.shape[1:] != (1,):
        raise ValueError(f"a decode step takes one token per sequence, tokens [batch, 1], at int32 [batch] positions, got "
                         f"{tuple(tokens.shape)} and {positions.dtype} {tuple(positions.shape)}")
    check_positions(positions, min(model.rope.shape[0], owner.block_table.shape[1] * owner.page), validate)
    state = owner.step_state(positions, tokens.shape[0], 1, validate=False)
    h = model.embed(tokens)
    for layer in model.layers:
        h = layer(h, state, model.rope, None)
    return model.head(model.norm(h)[:, -1]).float()


class DecodeGraphs:
    """`model(tokens, start_pos)` for decode steps on CUDA graphs, one graph per batch size (captured lazily).

    Only decode calls (tokens [batch, 1] on CUDA, batch <= max_batch, start_pos < max_seq_len - 1) go through
    graphs; `__call__` returns None for anything else and the caller runs it normally (a prefill)."""

    def __init__(self, model: nn.Module, max_batch: int, max_seq_len: int):
        from dskc.runtime.mla import KernelMLA

        if not all(hasattr(model, a) for a in ("embed", "layers", "norm", "head", "rope")):
            raise ValueError("CUDA-graph decode needs a dskc.model.Transformer-like module (embed, layers, norm, "
                             "head, rope)")
        if not any(isinstance(m, KernelMLA) for m in model.modules()):
            raise ValueError("CUDA-graph decode needs the MLA regions on dskc kernels (KernelMLA): none found")
        self.model, self.max_batch, self.max_seq_len = model, max_batch, max_seq_len
        self.graphs: dict = {}     # batch -> (graph, tokens, positions, logits)
        self.replays = 0

    def _capture(self, batch: int, device) -> tuple:
        tokens = torch.zeros(batch, 1, dtype=torch.long, device=device)
        positions = torch.full((batch,), self.max_seq_len - 1, dtype=torch.int32, device=device)
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):      # warm-up: Triton compiles / loads every kernel before capture
            for _ in range(2):
                decode_step(self.model, tokens, positions)
        torch.cuda.current_stream(device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            logits = decode_step(self.model, tokens, positions)
        log.info("dskc: captured the decode step for batch %d in a CUDA graph", batch)
        return graph, tokens, positions, logits

    def __call__(self, tokens: torch.Tensor, start_pos) -> torch.Tensor | None:
        if tokens.dim() != 2 or tokens.shape[1] != 1 or not tokens.is_cuda or isinstance(start_pos, torch.Tensor):
            return None
        batch = tokens.shape[0]
        if not (0 < batch <= self.max_batch and 0 <= int(start_pos) < self.max_seq_len - 1):
            return None   # the model's own forward checks it (the last position is kept for capture)
        if batch not in self.graphs:
            self.graphs[batch] = self._capture(batch, tokens.device)
        graph, tok, pos, logits = self.graphs[batch]
        tok.copy_(tokens)
        pos.fill_(int(start_pos))
        graph.replay()
        self.replays += 1
        return logits.clone()
