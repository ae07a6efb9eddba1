"""`mlx_lm cache_prompt` then `mlx_lm generate --prompt-cache-file`: the same text as generating
from the whole prompt, and a cache file whose size does not grow with the prompt (a state, not KV)."""

from helpers import fixtures
from helpers.cli import cli, generated_text
from mlx_lm import generate, load

QUERY = "def main():"


def test_cached_prefix_equals_whole_prompt_and_size_is_constant(model_folder, tmp_path):
    short, long = "import os", fixtures.training_text(2000)
    sizes = []
    for name, prefix in (("short", short), ("long", long)):
        cli("cache_prompt", "--model", model_folder, "--prompt", prefix, "--prompt-cache-file", tmp_path / f"{name}.safetensors")
        sizes.append((tmp_path / f"{name}.safetensors").stat().st_size)
    assert abs(sizes[0] - sizes[1]) < 64, sizes

    run = cli("generate", "--prompt-cache-file", tmp_path / "long.safetensors", "--ignore-chat-template",
              "--prompt", QUERY, "--max-tokens", "10")
    model, tokenizer = load(str(model_folder))
    # cache_prompt renders the prefix as the start of a user turn
    prefix_ids = tokenizer.apply_chat_template([{"role": "user", "content": long}], continue_final_message=True)
    assert len(prefix_ids) > 300
    whole = generate(model, tokenizer, prefix_ids + tokenizer.encode(QUERY), max_tokens=10)
    assert generated_text(run.stdout) == whole
