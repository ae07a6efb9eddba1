"""xLSTM over mx.distributed, in the two layouts mlx-lm's `sharded_load` knows.

Tensor parallel (`Model.shard`): each rank keeps num_heads / N heads of every mLSTM layer
(their q, k, v, output-gate, input- and forget-gate rows, and their slice of the per-head
norm); the recurrent state C, n, m then lives with its heads, so the cache shrinks by N
with no extra communication. The FFN splits its width. out_proj and down_proj sum the
partial results over the group: two all-reduces per block. Embedding and lm_head stay
replicated, as in mlx-lm's own models.

The paper's stack (`shard_paper`) splits the same way, by heads: an mLSTM layer keeps its
heads' slice of both up-projection halves, conv channels, q/k/v blocks, norm and skip, and
sums proj_down over the group; its input and forget gates read q, k, v of all heads, so the
ranks sum their partial gate pre-activations (one number per head and step). An sLSTM layer
runs its heads on their channels of the replicated input and gathers the heads' outputs;
its FFN splits like xLSTM-7b's.

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
        prefix = f"backbone.layers.{i}"
        split_inputs = {"mlstm_layer.out_proj": block.mlstm_layer.out_proj, "ffn.down_proj": block.ffn.down_proj}
        _check_split_inputs({f"{prefix}.{name}": linear for name, linear in split_inputs.items()}, N)


def _check_split_inputs(linears: dict, N: int):
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


def shard_paper(model, group: mx.distributed.Group):
    """Tensor parallel over the heads of the paper's stack; checks everything before changing anything."""
    N = group.size()
    check_paper_tensor_parallel(model, N)
    for block in model.layers:
        layer = block.xlstm
        if "mlstm_cell" in layer:
            # [x, z] = proj_up(x): each rank keeps its heads' rows of both halves.
            layer.proj_up = shard_linear(layer.proj_up, "all-to-sharded", segments=2, group=group)
            for part in (layer.q_proj, layer.k_proj, layer.v_proj, layer.mlstm_cell.outnorm):
                _split_channels(part, group)
            layer.learnable_skip = local_channels(layer.learnable_skip, group)
            cell = layer.mlstm_cell
            cell.igate, cell.fgate = HeadGatesFromShards(cell.igate, group), HeadGatesFromShards(cell.fgate, group)
            cell.num_heads //= N
            layer.inner_dim //= N
            layer.proj_down = shard_linear(layer.proj_down, "sharded-to-all", group=group)
        else:
            for part in (layer.fgate, layer.igate, layer.zgate, layer.ogate, layer.slstm_cell, layer.group_norm):
                _split_channels(part, group)
            layer.num_heads //= N
            layer.group = group
        if "conv1d" in layer:
            _split_channels(layer.conv1d, group)
            layer.conv1d.conv.groups //= N  # depthwise: one group per channel
        if "ffn" in block:
            ffn = block.ffn
            ffn.proj_up = shard_linear(ffn.proj_up, "all-to-sharded", segments=2, group=group)
            ffn.proj_down = shard_linear(ffn.proj_down, "sharded-to-all", group=group)
            ffn.hidden //= N


def check_paper_tensor_parallel(model, N: int):
    args = model.args

    def refuse(what):
        raise ValueError(
            f"xLSTM tensor parallel: {what} does not split over {N} ranks "
            "(use a group size that divides it, or pipeline parallel)"
        )

    kinds = set(args.block_map)
    if 0 in kinds:
        m, inner = args.mlstm_block.mlstm, args.mlstm_inner_dim
        if m.num_heads % N:
            refuse(f"mLSTM num_heads {m.num_heads} (inner width and conv channels {inner})")
        # A block of the headwise q/k/v projections must not straddle two ranks.
        if (inner // m.qkv_proj_blocksize) % N:
            refuse(f"mLSTM qkv_proj_blocksize {m.qkv_proj_blocksize} ({inner // m.qkv_proj_blocksize} blocks)")
    if 1 in kinds:
        NH = args.slstm_block.slstm.num_heads
        if NH % N:
            refuse(f"sLSTM num_heads {NH} (conv channels {args.embedding_dim})")
        if args.slstm_block.feedforward is not None and args.ffn_dim % N:
            refuse(f"FFN width {args.ffn_dim}")
    for i, block in enumerate(model.layers):
        prefix = f"xlstm_block_stack.layers.{i}"
        split_inputs = {name: m for name, m in block.named_modules() if name in ("xlstm.proj_down", "ffn.proj_down")}
        _check_split_inputs({f"{prefix}.{name}": linear for name, linear in split_inputs.items()}, N)


def _split_channels(module, group: mx.distributed.Group):
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

    def run_blocks(self, x, mask, cache):
        """This rank's blocks on the hidden states, between the hand-overs of the pipeline."""
        blocks = self.pipeline_layers
        cache = cache or [None] * len(blocks)
        x = self._receive_stage_input(x)
        for block, c in zip(blocks, cache):
            x = block(x, mask, c)
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
