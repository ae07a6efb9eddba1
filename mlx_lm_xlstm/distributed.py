"""xLSTM-7b over mx.distributed, in the two layouts mlx-lm's `sharded_load` knows.

Tensor parallel (`Model.shard`): each rank keeps num_heads / N heads of every mLSTM layer
(their q, k, v, output-gate, input- and forget-gate rows, and their slice of the per-head
norm); the recurrent state C, n, m then lives with its heads, so the cache shrinks by N
with no extra communication. The FFN splits its width. out_proj and down_proj sum the
partial results over the group: two all-reduces per block. Embedding and lm_head stay
replicated, as in mlx-lm's own models.

Pipeline parallel (`Model.model.pipeline`): mlx-lm's PipelineMixin layout, blocks split
over ranks, the last rank running the first blocks.
"""

import mlx.core as mx
import mlx.nn as nn
from mlx.nn.layers.distributed import shard_inplace, shard_linear
from mlx_lm.models.pipeline import PipelineMixin

# Projections whose outputs are laid out head after head.
HEAD_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "ogate_preact")
HEAD_GATES = ("igate_preact", "fgate_preact")


def shard_heads(model, group: mx.distributed.Group):
    """Tensor parallel over heads; checks everything before changing anything."""
    N = group.size()
    check_tensor_parallel(model, N)
    for block in model.layers:
        layer = block.mlstm_layer
        for name in HEAD_PROJECTIONS:
            setattr(layer, name, shard_linear(getattr(layer, name), "all-to-sharded", group=group))
        for name in HEAD_GATES:
            shard_inplace(getattr(layer, name), "all-to-sharded", group=group)
        shard_inplace(layer.multihead_norm, "all-to-sharded", group=group)
        layer.out_proj = shard_linear(layer.out_proj, "sharded-to-all", group=group)
        layer.num_heads //= N

        ffn = block.ffn
        ffn.gate_proj = shard_linear(ffn.gate_proj, "all-to-sharded", group=group)
        ffn.up_proj = shard_linear(ffn.up_proj, "all-to-sharded", group=group)
        ffn.down_proj = shard_linear(ffn.down_proj, "sharded-to-all", group=group)


def check_tensor_parallel(model, N: int):
    args = model.args
    if args.num_heads % N:
        raise ValueError(
            f"xLSTM tensor parallel: num_heads {args.num_heads} does not split over {N} ranks "
            "(use a group size that divides it, or pipeline parallel)"
        )
    if args.ffn_dim % N:
        raise ValueError(f"xLSTM tensor parallel: FFN width {args.ffn_dim} does not split over {N} ranks")
    for i, block in enumerate(model.layers):
        split_inputs = (("mlstm_layer.out_proj", block.mlstm_layer.out_proj), ("ffn.down_proj", block.ffn.down_proj))
        for name, linear in split_inputs:
            # A quantized layer split along its input needs whole groups on every rank.
            if isinstance(linear, nn.QuantizedLinear) and linear.scales.shape[-1] % N:
                groups, size = linear.scales.shape[-1], linear.group_size
                raise ValueError(
                    f"xLSTM tensor parallel: backbone.layers.{i}.{name} is quantized in {groups} "
                    f"groups of {size} along its input, which do not split over {N} ranks; "
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


class BlockPipeline(PipelineMixin):
    """mlx-lm's pipeline layout over `self.layers`, and the hand-over between stages."""

    pipeline_group = None

    def pipeline(self, group: mx.distributed.Group, split=None):
        if len(self.layers) < group.size():
            raise ValueError(f"xLSTM pipeline: {len(self.layers)} blocks cannot fill {group.size()} ranks")
        super().pipeline(group, split)
        self.pipeline_group = group

    def receive_stage_input(self, x):
        """Hidden states from the rank that runs the blocks before ours."""
        if self.pipeline_rank < self.pipeline_size - 1:
            x = mx.distributed.recv_like(x, self.pipeline_rank + 1, group=self.pipeline_group)
        return x

    def pass_stage_output(self, x, cache):
        """Hand our output on; every rank gets rank 0's, the output of the last block."""
        if self.pipeline_size == 1:
            return x
        if self.pipeline_rank > 0:
            x = mx.distributed.send(x, self.pipeline_rank - 1, group=self.pipeline_group)
            if cache[-1] is not None:
                # Evaluating the state then also runs the send.
                cache[-1][0] = mx.depends(cache[-1][0], x)
        return mx.distributed.all_gather(x, group=self.pipeline_group)[: x.shape[0]]
