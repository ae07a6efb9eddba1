"""`mlx_lm chat`: the recurrent state carries the conversation; turns are never re-prefilled.

mlx_lm/chat.py keeps one prompt cache for the session and sends only the new user turn
through the chat template; a base xLSTM checkpoint gets mlx_lm_xlstm/chat_template.py.
"""

import pytest
from helpers.cli import cli
from mlx_lm import load, stream_generate
from mlx_lm.models.cache import make_prompt_cache

TURNS = ["hello there", "what is a tuple?"]
MAX_TOKENS = 8


class CountingModel:
    """The model, recording how many tokens each call feeds it."""

    def __init__(self, model):
        self.model, self.fed = model, []

    def __call__(self, inputs, cache=None):
        self.fed.append(inputs.shape[1])
        return self.model(inputs, cache=cache)

    def __getattr__(self, name):
        return getattr(self.model, name)


def chat_session(model, tokenizer, turns):
    """What mlx_lm/chat.py does per turn, recording prompts, replies and fed tokens."""
    cache = make_prompt_cache(model)
    counting = CountingModel(model)
    log = []
    for query in turns:
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": query}], add_generation_prompt=True)
        counting.fed.clear()
        responses = list(stream_generate(counting, tokenizer, prompt, max_tokens=MAX_TOKENS, prompt_cache=cache))
        log.append((prompt, responses, sum(counting.fed)))
    return log


def test_template_is_the_plain_text_default(model_folder):
    _, tokenizer = load(str(model_folder))
    assert tokenizer.chat_template is None and tokenizer.has_chat_template
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": " hello"},
        {"role": "user", "content": "bye"},
    ]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text == "System: Be brief.\n\nUser: hi\n\nAssistant: hello<|endoftext|>User: bye\n\nAssistant:"
    with pytest.raises(ValueError, match="unknown role 'robot'"):
        tokenizer.apply_chat_template([{"role": "robot", "content": "x"}], tokenize=False)


def test_turns_carry_the_state_without_re_prefill(model_folder):
    model, tokenizer = load(str(model_folder))
    (p1, r1, fed1), (p2, r2, fed2) = chat_session(model, tokenizer, TURNS)
    # Each turn feeds only its own prompt and replies: the history lives in the state.
    assert fed1 == len(p1) + len(r1) and fed2 == len(p2) + len(r2)

    # One pass over the whole conversation gives the same second reply.
    history = p1 + [r.token for r in r1] + p2
    one_shot = [r.token for r in stream_generate(model, tokenizer, history, max_tokens=MAX_TOKENS)]
    assert one_shot == [r.token for r in r2]

    # The CLI prints the same replies.
    out = cli("chat", "--model", model_folder, "--max-tokens", MAX_TOKENS, input="\n".join(TURNS) + "\nq\n").stdout
    for responses in (r1, r2):
        assert "".join(r.text for r in responses) in out
    assert out.count(f"{MAX_TOKENS} tokens") == 2
