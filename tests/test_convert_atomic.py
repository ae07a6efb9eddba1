"""`python -m mlx_lm_xlstm.convert`: mlx_lm.convert's options, and never a half-written folder."""

import subprocess
import sys

import mlx_lm.utils
import pytest
from conftest import greedy_checked
from helpers.cli import ENV
from mlx_lm import load

from mlx_lm_xlstm.convert import convert


def test_cli_quantizes_into_a_folder_that_loads_and_generates(model_folder, tmp_path):
    out = tmp_path / "q4"
    subprocess.run(
        [sys.executable, "-m", "mlx_lm_xlstm.convert", "--hf-path", str(model_folder), "--mlx-path", str(out),
         "-q", "--q-bits", "4", "--q-group-size", "32"],
        check=True, capture_output=True, env=ENV, timeout=120,
    )
    assert [p.name for p in tmp_path.iterdir()] == ["q4"]
    model, tokenizer = load(str(out))
    assert model.backbone.layers[0].ffn.down_proj.bits == 4
    assert greedy_checked(model, tokenizer, "def", 4)


@pytest.mark.parametrize("step,error", [("save_config", OSError), ("create_model_card", KeyboardInterrupt)])
def test_a_failed_save_leaves_nothing_behind(model_folder, tmp_path, monkeypatch, step, error):
    def fail(*args, **kwargs):
        raise error("injected")

    monkeypatch.setattr(mlx_lm.utils, step, fail)  # create_model_card: after weights, config, tokenizer
    with pytest.raises(error, match="injected"):
        convert(hf_path=str(model_folder), mlx_path=str(tmp_path / "out"))
    assert list(tmp_path.iterdir()) == []


def test_an_existing_output_is_refused_before_any_work_and_kept(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    # The source does not exist: loading it would fail with another error.
    with pytest.raises(ValueError, match="already exists"):
        convert(hf_path=str(tmp_path / "missing"), mlx_path=str(out))
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    assert [p.name for p in out.iterdir()] == ["mine.txt"] and (out / "mine.txt").read_text() == "keep"


def test_upload_is_from_the_finished_folder(model_folder, tmp_path, monkeypatch):
    uploads = []
    monkeypatch.setattr(
        "mlx_lm_xlstm.convert.upload",
        lambda path, repo, source: uploads.append((path, repo, sorted(p.name for p in tmp_path.iterdir()))),
    )
    out = str(tmp_path / "out")
    convert(hf_path=str(model_folder), mlx_path=out, upload_repo="me/xlstm")
    assert uploads == [(out, "me/xlstm", ["out"])]
