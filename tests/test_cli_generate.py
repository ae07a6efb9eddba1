"""`mlx_lm generate` and the Python API (load, generate, stream_generate) on xLSTM folders."""

import shutil

import mlx.core as mx
from helpers.cli import cli, generated_text
from mlx_lm import generate, load, stream_generate
from mlx_lm.sample_utils import make_logits_processors, make_sampler

SAMPLING = ["--temp", "0.8", "--top-p", "0.9", "--top-k", "40", "--min-p", "0.02"]


def test_sampling_with_seed_matches_the_python_api(model_folder):
    args = ["generate", "--model", model_folder, "--prompt", "def", "--max-tokens", "16", "--verbose", "True"]
    first = cli(*args, *SAMPLING, "--seed", "7").stdout
    text = generated_text(first)
    assert text
    # --verbose reports timings and memory
    assert "Prompt: " in first and "tokens-per-sec" in first and "Peak memory:" in first

    # The Python API with the same seed; the CLI seeds before loading (init draws numbers).
    def sample(seed):
        mx.random.seed(seed)
        model, tokenizer = load(str(model_folder))
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": "def"}], add_generation_prompt=True)
        return generate(model, tokenizer, prompt, max_tokens=16, sampler=make_sampler(0.8, 0.9, min_p=0.02, top_k=40))

    assert sample(7) == text
    assert sample(8) != text


def test_streaming_pieces_add_up_to_generate(model_folder):
    model, tokenizer = load(str(model_folder))
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "class"}], add_generation_prompt=True)
    responses = list(stream_generate(model, tokenizer, prompt, max_tokens=12))
    assert len(responses) == 12 and responses[-1].finish_reason == "length"
    assert responses[-1].prompt_tokens == len(prompt) and responses[-1].peak_memory >= 0
    assert "".join(r.text for r in responses) == generate(model, tokenizer, prompt, max_tokens=12)


def test_repetition_penalty_breaks_greedy_loops(model_folder):
    model, tokenizer = load(str(model_folder))
    plain = list(stream_generate(model, tokenizer, "def f(x):", max_tokens=40))
    tokens = [r.token for r in plain]
    assert len(set(tokens)) < len(tokens)  # the tiny model loops
    penalised = stream_generate(
        model, tokenizer, "def f(x):", max_tokens=40,
        logits_processors=make_logits_processors(repetition_penalty=50.0, repetition_context_size=40),
    )
    assert len({r.token for r in penalised}) > len(set(tokens))


def test_prompt_without_bos_acts_as_if_bos_were_there(model_folder):
    out = cli("generate", "--model", model_folder, "--ignore-chat-template", "--max-tokens", "10", "--prompt", "return x")
    model, tokenizer = load(str(model_folder))
    ids = tokenizer.encode("return x")
    assert ids[0] != 0
    assert generated_text(out.stdout) == generate(model, tokenizer, [0] + ids, max_tokens=10)
    assert generate(model, tokenizer, ids, max_tokens=10) == generate(model, tokenizer, [0] + ids, max_tokens=10)


def _constant_model(source, path, token: int):
    """Every position predicts `token`: blocks add nothing, every embedding is e_0 and only
    lm_head row `token` reads e_0."""
    folder = shutil.copytree(source, path)
    weights = mx.load(str(folder / "model.safetensors"))
    for name, w in weights.items():
        if name.endswith(("out_proj.weight", "proj_down.weight")):
            weights[name] = mx.zeros_like(w)
    e0 = mx.zeros(weights["backbone.embeddings.weight"].shape[1]).at[0].add(1.0)
    weights["backbone.embeddings.weight"] = mx.broadcast_to(e0, weights["backbone.embeddings.weight"].shape)
    weights["backbone.out_norm.weight"] = mx.ones_like(weights["backbone.out_norm.weight"])
    weights["lm_head.weight"] = mx.zeros_like(weights["lm_head.weight"]).at[token].add(5.0 * e0)
    mx.save_safetensors(str(folder / "model.safetensors"), weights)
    return folder


def test_generation_stops_on_endoftext_and_never_on_exclamation_mark(model_folder, tmp_path):
    args = ["--ignore-chat-template", "--prompt", "hi", "--max-tokens", "6", "--verbose", "True"]
    bangs = cli("generate", "--model", _constant_model(model_folder, tmp_path / "bang", 2), *args).stdout
    assert generated_text(bangs) == "!" * 6  # id 2 is "!", not an end of text
    ends = cli("generate", "--model", _constant_model(model_folder, tmp_path / "eos", 0), *args).stdout
    assert "No text generated" in ends  # id 0 ends the text at once
