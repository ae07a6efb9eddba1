"""`mlx_lm lora` (LoRA, DoRA, full; --grad-checkpoint), `mlx_lm fuse`, `generate --adapter-path`."""

import json
import re

import pytest
from helpers import fixtures
from helpers.cli import cli, generated_text
from mlx_lm import generate, load

ANSI = re.compile(r"\x1b\[[0-9;]*m")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    path = tmp_path_factory.mktemp("data")
    text = fixtures.training_text(20_000)
    lines = [json.dumps({"text": text[i : i + 150]}) for i in range(0, 12_000, 150)]
    (path / "train.jsonl").write_text("\n".join(lines[:64]))
    (path / "valid.jsonl").write_text("\n".join(lines[64:72]))
    return path


def train(folder, data, adapters, kind, *extra, iters=20):
    out = cli(
        "lora", "--model", folder, "--train", "--data", data, "--fine-tune-type", kind, "--iters", iters,
        "--batch-size", "4", "--num-layers", "2", "--learning-rate", "1e-2", "--val-batches", "2",
        "--steps-per-report", "5", "--steps-per-eval", iters, "--max-seq-length", "160",
        "--adapter-path", adapters, *extra,
    ).stdout
    val = [float(v) for v in re.findall(r"val ([\d.]+)", ANSI.sub("", out))]
    return val


def test_lora_with_grad_checkpoint_fuse_and_adapter_generation(model_folder, data, tmp_path):
    adapters = tmp_path / "adapters"
    val = train(model_folder, data, adapters, "lora", "--grad-checkpoint", iters=12)
    assert len(val) == 2 and val[1] < val[0] - 0.3, val

    with_adapter = cli("generate", "--model", model_folder, "--adapter-path", adapters, "--prompt", "def",
                       "--max-tokens", "8")
    cli("fuse", "--model", model_folder, "--adapter-path", adapters, "--save-path", tmp_path / "fused")
    model, tokenizer = load(str(tmp_path / "fused"))
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "def"}], add_generation_prompt=True)
    assert generated_text(with_adapter.stdout) == generate(model, tokenizer, prompt, max_tokens=8)
    base, _ = load(str(model_folder))
    assert generate(base, tokenizer, prompt, max_tokens=8) != generate(model, tokenizer, prompt, max_tokens=8)


@pytest.mark.parametrize("kind", ["dora", "full"])
def test_dora_and_full_fine_tuning_lower_the_loss(model_folder, data, tmp_path, kind):
    val = train(model_folder, data, tmp_path / kind, kind, iters=10)
    assert len(val) == 2 and val[1] < val[0] - 0.3, val
