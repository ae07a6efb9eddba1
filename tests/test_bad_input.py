"""Bad input through the real CLIs: clear errors, nothing half-written."""

import json

import mlx.core as mx
import pytest
from conftest import chat_prompt, greedy_checked
from helpers import fixtures
from helpers.cli import cli, generated_text
from mlx_lm import generate, load
from mlx_lm.models.cache import load_prompt_cache, make_prompt_cache, save_prompt_cache


def test_unknown_option_values_are_refused_by_name(model_folder, tmp_path):
    run = cli("generate", "--model", model_folder, "--temp", "hot", check=False)
    assert run.returncode == 2 and "argument --temp: invalid float value: 'hot'" in run.stderr
    run = cli("convert", "--hf-path", model_folder, "--mlx-path", tmp_path / "out", "--dtype", "float8", check=False)
    assert run.returncode == 2 and "invalid choice: 'float8'" in run.stderr
    assert not (tmp_path / "out").exists()


def test_missing_shard_names_the_missing_tensors_and_convert_writes_nothing(model_folder, tmp_path):
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (sharded / name).write_bytes((model_folder / name).read_bytes())
    weights = mx.load(str(model_folder / "model.safetensors"))
    names = sorted(weights)
    half = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
            "model-00002-of-00002.safetensors": names[len(names) // 2 :]}
    for file, keys in half.items():
        mx.save_safetensors(str(sharded / file), {k: weights[k] for k in keys})
    index = {"weight_map": {k: f for f, keys in half.items() for k in keys}}
    (sharded / "model.safetensors.index.json").write_text(json.dumps(index))
    load(str(sharded))  # complete: loads
    (sharded / "model-00002-of-00002.safetensors").unlink()

    run = cli("convert", "--hf-path", sharded, "--mlx-path", tmp_path / "out", "--dtype", "bfloat16", check=False)
    assert run.returncode != 0 and "xLSTM checkpoint does not match its config: missing tensors" in run.stderr
    assert not (tmp_path / "out").exists()


def test_prompt_cache_from_another_model(model_folder, tmp_path):
    other = fixtures.random_model_dir(tmp_path / "other", hidden_size=64, num_heads=2)
    model, _ = load(str(other))
    cache = make_prompt_cache(model)
    model(mx.array([[5, 6, 7]]), cache=cache)
    save_prompt_cache(str(tmp_path / "other.safetensors"), cache, {"model": str(model_folder), "tokenizer_config": "{}"})

    run = cli("generate", "--prompt-cache-file", tmp_path / "other.safetensors", "--prompt", "x", check=False)
    assert run.returncode != 0 and "prompt cache does not fit this model" in run.stderr

    mine, tokenizer = load(str(model_folder))
    with pytest.raises(ValueError, match=r"C \(2, 16, 32\) per sequence; the model needs 2 layers with C \(heads, Dqk, Dv\) = \(2, 8, 16\)"):
        generate(mine, tokenizer, "x", max_tokens=2, prompt_cache=load_prompt_cache(str(tmp_path / "other.safetensors")))


def test_empty_prompt(model_folder):
    run = cli("generate", "--model", model_folder, "--prompt", "", "--ignore-chat-template", check=False)
    assert run.returncode != 0 and "prompt (or both) must be provided" in run.stderr
    # Through the chat template an empty message is still a prompt.
    text = generated_text(cli("generate", "--model", model_folder, "--prompt", "", "--max-tokens", "4").stdout)
    model, tokenizer = load(str(model_folder))
    assert text and text == greedy_checked(model, tokenizer, chat_prompt(tokenizer, ""), 4)


def test_long_prompt_streams_through_bounded_prefill_steps(model_folder):
    """mlx-lm feeds a prompt in --prefill-step-size pieces; the state is all that is kept."""
    model, tokenizer = load(str(model_folder))
    text = fixtures.training_text(12_000)
    ids = tokenizer.encode(text)
    assert len(ids) > 4000
    run = cli("generate", "--model", model_folder, "--prompt", "-", "--ignore-chat-template", "--max-tokens", "6",
              "--prefill-step-size", "512", input=text)
    assert generated_text(run.stdout) == generate(model, tokenizer, ids, max_tokens=6, prefill_step_size=3000)
