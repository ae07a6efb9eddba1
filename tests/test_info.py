"""Model info: sizes, state and the decode bound, from a config alone or a model folder."""

import json
from pathlib import Path

import mlx.core as mx
import pytest

from helpers import fixtures
from mlx_lm_xlstm import info, xlstm

CONFIG_7B = Path(__file__).resolve().parent.parent / "tools" / "xlstm_7b_config.json"


def test_7b_config_parses_without_transformers_and_has_the_known_parameter_count():
    config = json.loads(CONFIG_7B.read_text())
    assert config["chunkwise_kernel"] == "chunkwise--triton_xl_chunk"  # what transformers 5.x rejects
    args = xlstm.ModelArgs.from_dict(dict(config))
    assert (args.hidden_size, args.num_hidden_layers, args.qk_dim, args.v_dim, args.ffn_dim) == (4096, 32, 2048, 4096, 10944)
    assert info.describe(CONFIG_7B)["parameters"] == 6_865_424_896


@pytest.mark.parametrize(
    "dtype, bits, weight_gb, token_gb, tok_s_400",
    [
        (None, None, 27.46, 26.91, 14.9),  # as stored: fp32
        ("bfloat16", None, 13.74, 13.59, 29.4),
        ("bfloat16", 8, 7.30, 7.35, 54.4),
        ("bfloat16", 4, 3.87, 4.02, 99.4),
    ],
)
def test_7b_sizes_and_decode_bound_match_the_documented_figures(dtype, bits, weight_gb, token_gb, tok_s_400):
    quantization = dict(group_size=64, bits=bits, mode="affine") if bits else None
    i = info.describe(CONFIG_7B, dtype, quantization)
    assert i["source"] == "config"
    assert i["weight_bytes"] / 1e9 == pytest.approx(weight_gb, abs=0.006)
    assert i["bytes_per_token"] / 1e9 == pytest.approx(token_gb, abs=0.006)
    assert info.decode_bound(i, 400) == pytest.approx(tok_s_400, abs=0.06)
    # C (8 x 256 x 512), n (8 x 256), m (8) in fp32 per layer: 128.25 MiB over 32 layers.
    assert i["state_bytes"] == 32 * 4 * (8 * 256 * 512 + 8 * 256 + 8)
    (blocks,) = i["state_blocks"]
    assert (blocks["kind"], blocks["count"]) == ("mLSTM", 32)
    assert [s["shape"] for s in blocks["arrays"]] == [[1, 8, 256, 512], [1, 8, 256], [1, 8]]


def safetensors_payload(folder: Path) -> int:
    """The tensor bytes the folder holds, as mlx-lm's loader reads them."""
    return sum(a.nbytes for f in folder.glob("model*.safetensors") for a in mx.load(str(f)).values())


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    from mlx_lm import convert

    root = tmp_path_factory.mktemp("info")
    plain = fixtures.model_dir(root / "plain", "single", force_bos_token_insert=True)
    quant = root / "q4"
    convert(str(plain), str(quant), quantize=True, q_group_size=32, q_bits=4, dtype="bfloat16")
    return plain, quant


def test_folder_sizes_come_from_its_safetensors(folders):
    plain, _ = folders
    i = info.describe(plain)
    assert i["source"] == "safetensors"
    assert i["weight_bytes"] == safetensors_payload(plain)
    assert i["parameters"] == i["weight_bytes"] // 4  # the fixture is fp32
    assert i["architecture"]["blocks"] == 2 and i["architecture"]["heads"] == 2


def test_config_only_prediction_equals_what_convert_writes(folders):
    plain, quant = folders
    measured = info.describe(quant)
    assert measured["quantization"]["bits"] == 4 and measured["quantization"]["group_size"] == 32
    predicted = info.describe(plain / "config.json", "bfloat16", dict(group_size=32, bits=4, mode="affine"))
    assert predicted["source"] == "config"
    assert predicted["weight_bytes"] == measured["weight_bytes"] == safetensors_payload(quant)
    assert predicted["parameters"] == measured["parameters"]


def test_cli_prints_the_report(capsys):
    info.main([str(CONFIG_7B), "--dtype", "bfloat16", "--bits", "4", "--bandwidth-gbs", "400", "800"])
    out = capsys.readouterr().out
    assert "parameters:     6,865,424,896" in out
    assert "affine 4-bit, group size 64" in out
    assert "128.25 MiB (134,480,896 B) = 32 mLSTM blocks x (1x8x256x512 float32 + 1x8x256 float32 + 1x8 float32)" in out
    assert "99.4 tok/s at 400 GB/s" in out and "198.9 tok/s at 800 GB/s" in out


def test_cli_json(capsys):
    info.main([str(CONFIG_7B), "--json", "--bandwidth-gbs", "400"])
    data = json.loads(capsys.readouterr().out)
    assert data["parameters"] == 6_865_424_896
    assert data["decode_bound_tok_s"]["400.0"] == pytest.approx(14.87, abs=0.01)


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda d: d / "missing", "no model folder with a config.json"),
        (lambda d: (d / "c.json").write_text("{not json") and d / "c.json", "not valid JSON"),
        (lambda d: (d / "c.json").write_text('{"model_type": "llama"}') and d / "c.json", "expected 'xlstm'"),
    ],
)
def test_bad_input_is_named(tmp_path, capsys, make, message):
    with pytest.raises(SystemExit) as e:
        info.main([str(make(tmp_path))])
    assert e.value.code == 2
    assert message in capsys.readouterr().err


PAPER_MIXED = Path(__file__).resolve().parent / "fixtures" / "paper_mixed"


def test_a_mixed_paper_stack_counts_its_state_per_block_type(capsys):
    i = info.describe(PAPER_MIXED)
    assert i["architecture"]["num_blocks"] == 3 and i["architecture"]["slstm_at"] == [1]
    mlstm, slstm = i["state_blocks"]
    assert (mlstm["kind"], mlstm["count"], slstm["kind"], slstm["count"]) == ("mLSTM", 2, "sLSTM", 1)
    # mLSTM: the conv window (3 past steps of the inner 32), then C, n, m over 2 heads of 16.
    assert [a["shape"] for a in mlstm["arrays"]] == [[1, 3, 32], [1, 2, 16, 16], [1, 2, 16], [1, 2]]
    assert i["state_bytes"] == 2 * mlstm["bytes"] + slstm["bytes"]
    assert mlstm["bytes"] == 4 * (3 * 32 + 2 * 16 * 16 + 2 * 16 + 2)
    info.main([str(PAPER_MIXED)])
    out = capsys.readouterr().out
    assert "= 2 mLSTM blocks x (1x3x32 float32 + 1x2x16x16 float32 + 1x2x16 float32 + 1x2 float32) + 1 sLSTM block x (1x3x16 float32 + " in out
