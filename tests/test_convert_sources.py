"""`python -m mlx_lm_xlstm.convert`: NPZ sources, the error when a folder holds no weights, and
the model card it uploads (this plugin's, not mlx-lm's generic one)."""

import shutil
import subprocess
import sys
from pathlib import Path
from unittest import mock

import mlx.core as mx
import numpy as np
import pytest
from helpers.cli import ENV
from huggingface_hub import ModelCard
from mlx_lm import load

from mlx_lm_xlstm.convert import convert

IDS = mx.array(np.random.default_rng(0).integers(2, 320, (1, 24)))


def run_convert(*args):
    return subprocess.run([sys.executable, "-m", "mlx_lm_xlstm.convert", *map(str, args)],
                          capture_output=True, text=True, env=ENV, timeout=120)


@pytest.fixture(scope="module")
def npz_folder(model_folder, tmp_path_factory):
    """The session's model folder with its weights (transformers' names) in an .npz file."""
    folder = tmp_path_factory.mktemp("npz") / "xlstm"
    shutil.copytree(model_folder, folder)
    weights = {}
    for file in sorted(folder.glob("*.safetensors*")):
        if file.suffix == ".safetensors":
            weights.update(mx.load(str(file)))
        file.unlink()
    mx.savez(str(folder / "weights.npz"), **weights)
    return folder


def test_npz_weights_convert_with_the_cli_options(model_folder, npz_folder, tmp_path):
    run = run_convert("--hf-path", npz_folder, "--mlx-path", tmp_path / "q4", "-q", "--q-bits", "4",
                      "--q-group-size", "32", "--dtype", "bfloat16")
    assert run.returncode == 0, run.stderr
    model, _ = load(str(tmp_path / "q4"))
    assert model.backbone.layers[0].ffn.down_proj.bits == 4
    # Unquantized, the converted NPZ model is the safetensors source, logit for logit.
    convert(hf_path=str(npz_folder), mlx_path=str(tmp_path / "fp32"), dtype="float32")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fp32", "q4"]  # no scratch view left
    reference, _ = load(str(model_folder))
    converted, _ = load(str(tmp_path / "fp32"))
    assert mx.array_equal(converted(IDS), reference(IDS)).item()
    assert not list(npz_folder.glob("*.safetensors"))  # the source is left as it was


def test_a_folder_without_weights_names_both_formats(tmp_path, model_folder):
    source = tmp_path / "empty"
    source.mkdir()
    shutil.copy(model_folder / "config.json", source)
    run = run_convert("--hf-path", source, "--mlx-path", tmp_path / "out")
    assert run.returncode == 2
    assert "no weights found: expected *.safetensors or *.npz files" in run.stderr and "Traceback" not in run.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty"]  # nothing half-written


def test_upload_sends_this_plugins_card(model_folder, tmp_path):
    source = tmp_path / "src"
    shutil.copytree(model_folder, source)
    (source / "README.md").write_text("---\nlicense: apache-2.0\n---\nA tiny xLSTM.\n")
    out = tmp_path / "q4"
    with mock.patch("huggingface_hub.HfApi") as api:
        convert(hf_path=str(source), mlx_path=str(out), quantize=True, q_bits=4, q_group_size=32,
                upload_repo="me/xlstm-4bit")
    hub = api.return_value
    hub.create_repo.assert_called_once_with(repo_id="me/xlstm-4bit", exist_ok=True)
    hub.upload_large_folder.assert_called_once_with(folder_path=str(out), repo_id="me/xlstm-4bit", repo_type="model")
    card = ModelCard.load(out / "README.md")
    assert card.data.license == "apache-2.0" and card.data.library_name == "mlx"
    assert {"xlstm", "mlx-lm-xlstm", "4-bit"} <= set(card.data.tags)
    assert "4-bit affine quantization, group size 32" in card.text
    assert "pip install -e ." in card.text and "pip install mlx-lm-xlstm" in card.text
    assert 'mlx_lm.generate --model me/xlstm-4bit --ignore-chat-template --prompt "' in card.text
    assert "pip install mlx-lm\n" not in card.text  # mlx-lm's generic card


DEMO = Path(__file__).resolve().parent.parent / "demo" / "xlstm-stdlib"


@pytest.mark.parametrize("group_size", [128, 64])
def test_converting_says_which_layers_a_group_size_leaves_in_float(tmp_path, group_size):
    """The demo is 192 wide: group 128 leaves nearly everything in float (14.2 bits per weight)."""
    run = run_convert("--hf-path", DEMO, "--mlx-path", tmp_path / "q", "-q", "--q-group-size", group_size)
    assert run.returncode == 0, run.stderr
    warnings = [line for line in run.stderr.splitlines() if "stay unquantized" in line]
    if group_size == 64:
        assert warnings == []
    else:
        assert warnings == [
            "[WARNING] xLSTM: 14 layers stay unquantized (backbone.embeddings, backbone.layers.*.ffn.gate_up_proj, "
            "backbone.layers.*.mlstm_layer.out_proj, backbone.layers.*.mlstm_layer.qkvo_proj, lm_head): their input "
            "width [192] is not a multiple of the group size 128; --q-group-size 64 or 32 quantizes them too"
        ]
        assert "UserWarning" not in run.stderr
