"""Tensor and pipeline parallel over two ranks (ring backend, this machine): greedy tokens
as in one process, for a bf16 and a 4-bit xLSTM-7b-shaped model and the paper's stack; and
the shapes that cannot be split."""

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import mlx.core as mx
import mlx.nn as nn
import pytest
from helpers import distributed_worker, fixtures
from helpers import paper_fixtures as pf
from helpers.cli import free_port
from mlx_lm.convert import convert
from mlx_lm.utils import quantize_model

from mlx_lm_xlstm import large, paper

WORKER = Path(distributed_worker.__file__)
LAUNCH = Path(sys.executable).parent / "mlx.launch"
XLSTM_7B = Path(__file__).resolve().parent.parent / "tools" / "xlstm_7b_config.json"
# Enough heads and width for 2 ranks, and groups of 32 that split: v_dim 64 -> 2, FFN 192 -> 6.
TINY = dict(hidden_size=64, num_hidden_layers=2, num_heads=4, chunk_size=16, ffn_round_up_to_multiple_of=64)


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    """Random-weight tiny models (4 heads, 2 blocks): bf16, and 4-bit in groups of 32
    that split over 2 ranks (fp32 scales, so the tokens do not hang on bf16 rounding);
    transformers' fused-weight checkpoint with biases everywhere (4 heads); the paper's
    sLSTM/mLSTM stack (3 blocks, sLSTM in the middle)."""
    root = tmp_path_factory.mktemp("dist")
    bf16 = fixtures.random_model_dir(root / "bf16", dtype="bfloat16", **TINY)
    q4 = fixtures.random_model_dir(root / "q4", q_bits=4, q_group_size=32, **TINY)
    fused_bias = fixtures.model_dir(root / "fused_bias", "fused_bias")
    # Pipeline loading needs mlx-lm's layout (`layers.N.` names, an index): convert first.
    convert(str(fixtures.model_dir(root / "paper_mixed", "paper_mixed")), str(root / "paper_mlx"))
    return [bf16, q4, fused_bias, root / "paper_mlx"]


def test_two_ranks_give_the_tokens_of_one_process(model_dirs, tmp_path):
    bf16, q4, fused_bias, paper = model_dirs
    cases = [f"{d}:{mode}" for d in (bf16, q4) for mode in ("tensor", "pipeline")]
    cases += [f"{fused_bias}:tensor", f"{paper}:tensor", f"{paper}:pipeline"]
    out = tmp_path / "two.json"
    # A free port, so that two test runs on one machine do not meet.
    cmd = [str(LAUNCH), "-n", "2", "-p", str(free_port()), "--python", sys.executable, "--", str(WORKER)]
    proc = subprocess.run([*cmd, *cases, "--out", str(out)], capture_output=True, text=True, timeout=150)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    two = json.loads(out.read_text())

    one = distributed_worker.run_cases([f"{d}:single" for d in model_dirs])
    reference = {case["model"]: case["tokens"] for case in one}
    for case in two:
        tokens = reference[case["model"]]
        assert len(set(tokens)) > 1, "a model that repeats one token would prove nothing"
        assert case["ranks"] == 2
        logprobs = next(c for c in one if c["model"] == case["model"])["prompt_logprobs"]
        gap = max(abs(x - y) for x, y in zip(case["prompt_logprobs"], logprobs))
        if case["model"] == str(bf16):
            # bf16 matmuls over half the rows and a bf16 all-reduce round differently from
            # one process: the distribution agrees to bf16 rounding, a near-tie may flip later
            assert gap < 0.1 and case["tokens"][0] == tokens[0], (gap, case)
        else:
            assert case["tokens"] == tokens, case
        # Rank 0 holds half the heads (tensor) or the last blocks (pipeline).
        expected = {"tensor": (2, 2), "pipeline": (4, 1)}[case["mode"]]
        if case["model"] == str(paper):
            # Tensor: 1 of the first mLSTM's 2 heads; pipeline: blocks 1-2, the sLSTM first.
            expected = {"tensor": (1, 3), "pipeline": (2, 2)}[case["mode"]]
            # fp32 weights: the distribution after the prompt as one process's, to rounding.
            assert gap < 1e-4
        assert (case["local_heads"], case["local_blocks"]) == expected, case


def group_of_size(size=2, rank=0):
    """Stands in for a group: the checks run before any communication."""
    return SimpleNamespace(size=lambda: size, rank=lambda: rank)


def tiny_model(**overrides):
    config = {"model_type": "xlstm", **TINY, "vocab_size": 64, **overrides}
    return large.Model(large.ModelArgs.from_dict(config))


def test_heads_that_do_not_split():
    model = tiny_model()
    with pytest.raises(ValueError, match="num_heads 4 does not split over 3 ranks"):
        model.shard(group_of_size(3))
    assert model.layers[0].mlstm_layer.num_heads == 4
    assert isinstance(model.layers[0].mlstm_layer.qkvo_proj, nn.Linear)


def test_ffn_width_that_does_not_split():
    model = tiny_model(ffn_proj_factor=2.68, ffn_round_up_to_multiple_of=1)  # 64 x 2.68 -> 171
    with pytest.raises(ValueError, match="FFN width 171 does not split over 2 ranks"):
        model.shard(group_of_size())


def xlstm_7b():
    """xLSTM-7b's config.json; the weights stay lazy, so nothing is computed."""
    return large.Model(large.ModelArgs.from_dict(json.loads(XLSTM_7B.read_text())))


def test_7b_shard_shapes():
    model = xlstm_7b()
    model.shard(group_of_size(2))
    layer, ffn = model.layers[0].mlstm_layer, model.layers[0].ffn
    assert layer.num_heads == 4
    # this rank's q, k, v and output-gate rows, in that order
    assert layer.qkvo_proj.weight.shape == (1024 + 1024 + 2048 + 2048, 4096) and layer.splits == [1024, 2048, 4096]
    assert layer.if_gate_preact.bias.shape == (4 + 4,)
    assert (layer.multihead_norm.weight.shape, layer.out_proj.weight.shape) == ((2048,), (4096, 2048))
    assert (ffn.gate_up_proj.weight.shape, ffn.down_proj.weight.shape) == ((2 * 5472, 4096), (4096, 5472))


def test_quantized_groups_that_do_not_split():
    # 4-bit group 64, as `mlx_lm convert -q` makes it: down_proj has 10944 / 64 = 171 groups.
    model, _ = quantize_model(xlstm_7b(), {}, group_size=64, bits=4)
    refusal = r"layers\.0\.ffn\.down_proj is quantized in 171 groups of 64.*2 ranks; --q-group-size 32 splits"
    with pytest.raises(ValueError, match=refusal):
        model.shard(group_of_size(2))
    assert isinstance(model.layers[0].mlstm_layer.qkvo_proj, nn.QuantizedLinear)
    assert model.layers[0].mlstm_layer.num_heads == 8


def test_more_ranks_than_blocks():
    model = tiny_model()
    with pytest.raises(ValueError, match="2 blocks cannot fill 3 ranks"):
        model.model.pipeline(group_of_size(3))
    assert len(model.layers) == 2


@pytest.mark.parametrize("make", [tiny_model, lambda: paper_model()], ids=["7b-shaped", "paper"])
def test_one_rank_changes_nothing(make):
    model = make()
    x = mx.array([[3, 1, 4, 1, 5]])
    before = model(x)
    model.shard(mx.distributed.init())
    model.model.pipeline(mx.distributed.init())
    assert mx.allclose(model(x), before, atol=1e-6).item()


# --- the paper's stack -------------------------------------------------------------------------


def paper_model(changes=()):
    """paper_fixtures' tiny mixed stack (mLSTM, sLSTM, mLSTM) with changes to its nested
    config, as {"slstm_block.slstm.num_heads": 1, ...}."""
    config = pf.paper_config(num_blocks=3, slstm_at=[1])
    for path, value in dict(changes).items():
        *parents, key = path.split(".")
        node = config
        for name in parents:
            node = node[name]
        node[key] = value
    return paper.Model(paper.ModelArgs.from_dict(config))


@pytest.mark.parametrize(
    "changes, ranks, refusal",
    [
        ({}, 3, r"mLSTM num_heads 2 \(inner width and conv channels 32\) does not split over 3 ranks"),
        ({"embedding_dim": 24, "mlstm_block.mlstm.qkv_proj_blocksize": 16}, 2,
         r"mLSTM qkv_proj_blocksize 16 \(3 blocks\) does not split over 2 ranks"),
        ({"slstm_block.slstm.num_heads": 1}, 2, r"sLSTM num_heads 1 \(conv channels 16\) does not split"),
        ({"slstm_block.feedforward.round_proj_up_to_multiple_of": 1}, 2, "FFN width 21 does not split"),
    ],
)
def test_paper_shapes_that_do_not_split(changes, ranks, refusal):
    model = paper_model(changes)
    with pytest.raises(ValueError, match=refusal + ".*pipeline parallel"):
        model.shard(group_of_size(ranks))
    assert isinstance(model.layers[0].xlstm.proj_up, nn.Linear)
    assert model.layers[1].xlstm.num_heads == model.args.slstm_block.slstm.num_heads


def test_paper_quantized_groups_that_do_not_split():
    model, _ = quantize_model(paper_model(), {}, group_size=32, bits=4)  # proj_down: 32 inputs, 1 group
    refusal = r"layers\.0\.xlstm\.proj_down is quantized in 1 groups of 32.*over 2 ranks"
    with pytest.raises(ValueError, match=refusal):
        model.shard(group_of_size(2))
    assert model.layers[0].xlstm.mlstm_cell.num_heads == 2


def test_paper_shard_keeps_the_heads_of_the_rank():
    """Rank 1 of 2: the second head of each layer, in both halves of the mLSTM's proj_up and
    in the gates' q, k and v columns; the sLSTM's second head on its channels."""
    model = paper_model()
    mlstm, slstm = model.layers[0].xlstm, model.layers[1].xlstm
    up, gate, kernel = mlstm.proj_up.weight, mlstm.mlstm_cell.igate.weight, slstm.slstm_cell.recurrent_kernel
    model.shard(group_of_size(2, rank=1))
    assert mx.array_equal(mlstm.proj_up.weight, mx.concatenate([up[16:32], up[48:64]])).item()
    assert mx.array_equal(mlstm.mlstm_cell.igate.weight, gate[:, [*range(16, 32), *range(48, 64), *range(80, 96)]]).item()
    assert (mlstm.mlstm_cell.num_heads, mlstm.inner_dim, mlstm.q_proj.weight.shape[0]) == (1, 16, 4)
    assert (mlstm.conv1d.conv.weight.shape, mlstm.conv1d.conv.groups, mlstm.learnable_skip.shape) == ((16, 4, 1), 16, (16,))
    assert mx.array_equal(slstm.slstm_cell.recurrent_kernel, kernel[1:]).item()
    assert (slstm.num_heads, slstm.conv1d.conv.groups, model.layers[1].ffn.hidden) == (1, 8, 16)
