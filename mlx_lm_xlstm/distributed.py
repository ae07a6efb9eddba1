"""The generic pieces of xLSTM over mx.distributed, in the two layouts mlx-lm's `sharded_load` knows.

Tensor parallel (`Model.shard`, each model says how it splits): a rank keeps num_heads / N
heads of every layer with their recurrent state, so the cache shrinks by N with no extra
communication; the FFN splits its width; output projections sum over the group. Here:
the checks that a split is whole, the paper mLSTM's gates summed from per-rank columns,
and the channel helpers.

Pipeline parallel (`Model.model.pipeline`): mlx-lm's PipelineMixin layout, blocks split
over ranks, the last rank running the first blocks.
"""

import mlx.core as mx
import mlx.nn as nn
from mlx.nn.layers.distributed import shard_inplace
from mlx_lm.models.pipeline import PipelineMixin


def check_split_inputs(linears: dict, N: int):
    """A quantized layer split along its input needs whole groups on every rank."""
    for name, linear in linears.items():
        if isinstance(linear, nn.QuantizedLinear) and linear.scales.shape[-1] % N:
            groups, size = linear.scales.shape[-1], linear.group_size
            raise ValueError(
                f"xLSTM tensor parallel: {name} is quantized in {groups} groups of {size} "
                f"along its input, which do not split over {N} ranks; "
                f"{_group_sizes_that_split(groups * size, N)}"
            )


def _group_sizes_that_split(width: int, N: int) -> str:
    fits = [g for g in (32, 64, 128) if width % g == 0 and (width // g) % N == 0]
    # mlx-lm's quantize leaves a layer in float when the group size does not divide its input.
    floats = [g for g in (32, 64, 128) if width % g and width % N == 0]
    hint = f"--q-group-size {' or '.join(map(str, fits))} splits" if fits else "no group size splits"
    if floats:
        hint += f"; at {' or '.join(map(str, floats))} mlx-lm keeps this layer in float, which splits"
    return hint


def split_channels(module, group: mx.distributed.Group):
    """Every parameter split along its first axis: channels, heads or headwise blocks."""
    shard_inplace(module, lambda path, _: 0, group=group)


class HeadGatesFromShards(nn.Module):
    """The paper mLSTM's input or forget gate when q, k, v, its input, are split by heads:
    each rank multiplies its columns, the partial pre-activations of all heads (one number
    per head and step) are summed over the group, and each rank keeps its heads' own."""

    def __init__(self, gate, group: mx.distributed.Group):
        super().__init__()
        N, r = group.size(), group.rank()
        H = gate.weight.shape[0]
        # The input is [q, k, v], each laid out head after head.
        self.weight = mx.contiguous(gate.weight.reshape(H, 3, N, -1)[:, :, r].reshape(H, -1))
        self.bias = mx.split(gate.bias, N)[r]
        self.heads = slice(r * H // N, (r + 1) * H // N)
        self.group = group

    def __call__(self, x):
        partial = x.astype(mx.float32) @ self.weight.astype(mx.float32).T
        return mx.distributed.all_sum(partial, group=self.group)[..., self.heads] + self.bias


def local_channels(x, group: mx.distributed.Group):
    """This rank's 1/N of the last axis (the channels of its heads)."""
    return mx.split(x, group.size(), axis=-1)[group.rank()]


def gather_channels(x, group: mx.distributed.Group):
    """Every rank's channels, in rank order, along the last axis."""
    parts = mx.distributed.all_gather(x[None], group=group)
    return mx.moveaxis(parts, 0, -2).reshape(*x.shape[:-1], -1)


class BlockPipeline(PipelineMixin):
    """mlx-lm's pipeline layout over `self.layers`, and the hand-over between stages."""

    pipeline_group = None

    def pipeline(self, group: mx.distributed.Group, split=None):
        if len(self.layers) < group.size():
            raise ValueError(f"xLSTM pipeline: {len(self.layers)} blocks cannot fill {group.size()} ranks")
        super().pipeline(group, split)
        self.pipeline_group = group

    def run_blocks(self, x, mask, cache, **kwargs):
        """This rank's blocks on the hidden states, between the hand-overs of the pipeline;
        `kwargs` go to every block."""
        blocks = self.pipeline_layers
        cache = cache or [None] * len(blocks)
        x = self._receive_stage_input(x)
        for block, c in zip(blocks, cache):
            x = block(x, mask, c, **kwargs)
        return self._pass_stage_output(x, cache)

    def _receive_stage_input(self, x):
        """Hidden states from the rank that runs the blocks before ours."""
        if self.pipeline_rank < self.pipeline_size - 1:
            x = mx.distributed.recv_like(x, self.pipeline_rank + 1, group=self.pipeline_group)
        return x

    def _pass_stage_output(self, x, cache):
        """Hand our output on; every rank gets rank 0's, the output of the last block."""
        if self.pipeline_size == 1:
            return x
        if self.pipeline_rank > 0:
            x = mx.distributed.send(x, self.pipeline_rank - 1, group=self.pipeline_group)
            if cache[-1] is not None:
                # Evaluating the state then also runs the send.
                cache[-1][0] = mx.depends(cache[-1][0], x)
        return mx.distributed.all_gather(x, group=self.pipeline_group)[: x.shape[0]]
