"""Publishing: the dry run builds loadable, carded folders offline; uploads go through HfApi
(mocked here: no network is ever touched)."""

import json
import socket
import sys
from pathlib import Path
from unittest import mock

import pytest

from helpers import fixtures

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "upload_scripts"))
import publish  # noqa: E402

FAST = ["--group-size", "32", "--eval-tokens", "256", "--speed-tokens", "4", "--license", "apache-2.0",
        "--base-model", "NX-AI/xLSTM-7b", "--name", "xLSTM-tiny", "--org", "mlx-community"]


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a test tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    return fixtures.model_dir(tmp_path_factory.mktemp("pub") / "xlstm", "single", force_bos_token_insert=True)


@pytest.fixture(scope="module")
def dry_run(source, tmp_path_factory):
    out = tmp_path_factory.mktemp("built")
    api = mock.MagicMock()
    with mock.patch("huggingface_hub.HfApi", api), mock.patch("sys.stdout.write") as write:
        built = publish.main([str(source), "--out", str(out), "--dry-run", "--variants", "bf16", "4bit", "mixed_3_6", *FAST])
    printed = "".join(c.args[0] for c in write.call_args_list)
    return built, out, printed, api


def test_dry_run_builds_every_variant_in_place_and_calls_no_hub(dry_run):
    built, out, printed, api = dry_run
    assert list(built) == ["mlx-community/xLSTM-tiny-bf16", "mlx-community/xLSTM-tiny-4bit", "mlx-community/xLSTM-tiny-mixed_3_6"]
    assert sorted(p.name for p in out.iterdir()) == ["xLSTM-tiny-4bit", "xLSTM-tiny-bf16", "xLSTM-tiny-mixed_3_6"]  # no temp left
    assert not api.called
    for repo_id, folder in built.items():
        assert f"would upload {folder} -> https://huggingface.co/{repo_id}" in printed
        assert "model.safetensors" in printed and "README.md" in printed
    assert "total" in printed and "in 3 repos" in printed


def test_variants_have_the_asked_dtype_and_quantization(dry_run):
    built, *_ = dry_run
    bf16, q4, mixed = (json.loads((f / "config.json").read_text()) for f in built.values())
    assert "quantization" not in bf16
    assert q4["quantization"]["bits"] == 4 and q4["quantization"]["group_size"] == 32
    assert q4["eos_token_id"] == 0  # never "!" (id 2)
    # mixed_3_6: 6 bits for lm_head and, in the last eighth of the blocks, the FFN down projection.
    q = mixed["quantization"]
    assert q["lm_head"]["bits"] == 6
    assert q["backbone.layers.1.ffn.down_proj"]["bits"] == 6 and q["backbone.layers.1.mlstm_layer.qkvo_proj"]["bits"] == 3
    assert q["backbone.layers.0.ffn.down_proj"]["bits"] == 3 and q["backbone.layers.0.mlstm_layer.qkvo_proj"]["bits"] == 3
    from mlx_lm_xlstm.info import safetensors_bytes

    tensors = safetensors_bytes(list(built.values())[2])
    assert "backbone.layers.0.mlstm_layer.if_gate_preact.scales" not in tensors  # gates are never quantized
    assert tensors["backbone.layers.0.mlstm_layer.if_gate_preact.weight"][0] == "float32"  # cast_predicate


def test_built_folders_load_and_match_the_source(source, dry_run):
    """Each folder is the source model converted: its logits are the source's within what the
    variant's rounding gives (RMS error relative to the logits' RMS, measured on this fixture:
    bf16 0.011, 4-bit 0.24, mixed 3/6 0.51)."""
    import mlx.core as mx
    import numpy as np
    from mlx_lm import load

    built, *_ = dry_run
    ids = mx.array(np.random.default_rng(0).integers(2, 320, (1, 48)))
    reference = np.array(load(str(source))[0](ids))
    bounds = {"bf16": 0.02, "4bit": 0.35, "mixed_3_6": 0.7}
    for folder in built.values():
        model, _ = load(str(folder))
        logits = np.array(model(ids).astype(mx.float32))
        error = np.sqrt(((logits - reference) ** 2).mean() / (reference**2).mean())
        assert error < bounds[folder.name.rsplit("-", 1)[1]], (folder.name, error)


def test_card_metadata_and_usage(dry_run):
    from huggingface_hub import ModelCard

    built, *_ = dry_run
    for repo_id, folder in built.items():
        c = ModelCard.load(folder / "README.md")
        assert c.data.base_model == "NX-AI/xLSTM-7b"
        assert c.data.license == "apache-2.0"
        assert c.data.library_name == "mlx"
        assert c.data.pipeline_tag == "text-generation"
        assert {"mlx", "xlstm"} <= set(c.data.tags)
        assert "pip install -e ." in c.text and "pip install mlx-lm-xlstm" in c.text  # today / once released
        assert f'mlx_lm.generate --model {repo_id} --ignore-chat-template --prompt "' in c.text
        assert f'load("{repo_id}")' in c.text
        # quality and speed rows for every variant, measured here
        for variant in ("bf16", "4bit", "mixed_3_6"):
            row = next(line for line in c.text.splitlines() if line.startswith(f"| [{variant}]"))
            ppl, tps = row.split("|")[3].strip(), row.split("|")[4].strip()
            assert "±" in ppl and float(ppl.split("±")[0]) > 1
            assert float(tps) > 0
        assert "the source weights (float32) give" in c.text
    assert "4-bit" in ModelCard.load(built["mlx-community/xLSTM-tiny-4bit"] / "README.md").data.tags


def hub_mock(whoami):
    api = mock.MagicMock()
    api.return_value.whoami.side_effect = whoami
    return api


def run_error(argv, capsys) -> str:
    with pytest.raises(SystemExit) as e:
        publish.main(argv)
    assert e.value.code == 2
    return capsys.readouterr().err


def test_missing_token_is_a_clear_error_before_any_work(source, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    with mock.patch("huggingface_hub.get_token", return_value=None), mock.patch("huggingface_hub.HfApi") as api:
        err = run_error([str(source), "--out", str(tmp_path / "out"), *FAST], capsys)
    assert "no Hugging Face token" in err and "huggingface-cli login" in err
    assert not api.called
    assert not (tmp_path / "out").exists()


def test_unreachable_hub_is_a_clear_error_before_any_work(source, tmp_path, capsys):
    api = hub_mock(ConnectionError("Failed to resolve 'huggingface.co'"))
    with mock.patch("huggingface_hub.HfApi", api):
        err = run_error([str(source), "--out", str(tmp_path / "out"), "--token", "hf_x", *FAST], capsys)
    assert "cannot reach the Hugging Face Hub" in err and "--dry-run" in err
    api.assert_called_once_with(token="hf_x")
    assert not (tmp_path / "out").exists()


def test_upload_creates_each_repo_and_uploads_its_folder(source, tmp_path):
    api = hub_mock(lambda: {"name": "tester"})
    with mock.patch("huggingface_hub.HfApi", api):
        built = publish.main([str(source), "--out", str(tmp_path), "--token", "hf_x", "--no-eval",
                              "--variants", "bf16", "8bit", *FAST])
    hub = api.return_value
    assert [c.kwargs["repo_id"] for c in hub.create_repo.call_args_list] == list(built)
    assert all(c.kwargs["exist_ok"] and c.kwargs["repo_type"] == "model" for c in hub.create_repo.call_args_list)
    uploads = [(c.kwargs["repo_id"], c.kwargs["folder_path"]) for c in hub.upload_folder.call_args_list]
    assert uploads == [(r, str(f)) for r, f in built.items()]
    assert "not measured" in (built["mlx-community/xLSTM-tiny-8bit"] / "README.md").read_text()


def test_repo_id_not_cached_is_a_clear_error_in_a_dry_run(tmp_path, monkeypatch, capsys):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    err = run_error(["NX-AI/xLSTM-7b", "--out", str(tmp_path / "out"), "--dry-run"], capsys)
    assert "not in the local Hugging Face cache" in err and "huggingface-cli download NX-AI/xLSTM-7b" in err


def test_bad_source_and_existing_output_are_named(source, tmp_path, capsys):
    assert "no such folder" in run_error([str(tmp_path / "nope.d/x/y"), "--dry-run"], capsys)
    (tmp_path / "xLSTM-tiny-bf16").mkdir()
    err = run_error([str(source), "--out", str(tmp_path), "--dry-run", "--variants", "bf16", *FAST], capsys)
    assert "already built" in err and "--overwrite" in err


def test_the_cards_command_runs_as_written_and_completes_the_raw_prompt(dry_run):
    """The card's `mlx_lm.generate` line (repo id -> the built folder) gives raw completion of its
    prompt, not the prompt wrapped in the chat template."""
    import shlex

    from helpers.cli import cli, generated_text
    from huggingface_hub import ModelCard
    from mlx_lm import generate, load

    built, *_ = dry_run
    repo_id, folder = next(iter(built.items()))
    line = next(l for l in ModelCard.load(folder / "README.md").text.splitlines() if l.startswith("mlx_lm.generate "))
    args = shlex.split(line.replace(repo_id, str(folder)))[1:]
    out = cli("generate", *args, "--max-tokens", "8").stdout
    model, tokenizer = load(str(folder))
    prompt = args[args.index("--prompt") + 1]
    assert generated_text(out) == generate(model, tokenizer, prompt, max_tokens=8)


def test_a_dry_run_without_out_leaves_nothing_behind(source, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    built = publish.main([str(source), "--dry-run", "--variants", "bf16", "--no-eval", *FAST])
    assert list(tmp_path.iterdir()) == []  # no ./mlx_models
    assert not any(folder.exists() for folder in built.values())
    out = capsys.readouterr().out
    assert "would upload" in out and "pass --out DIR to keep the folders" in out


def test_a_source_without_a_license_needs_one(source, tmp_path, capsys):
    assert not (source / "README.md").exists()
    argv = [str(source), "--dry-run", "--variants", "bf16", "--no-eval", "--out", str(tmp_path)]
    err = run_error(argv, capsys)
    assert "no license" in err and "pass --license" in err
