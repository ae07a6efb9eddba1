"""The plain chat template: a rendered history is the token stream the model already ran."""

import pytest

from mlx_lm_xlstm.chat_template import apply_chat_template

HISTORY = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "hi"},
]
REPLIES = ["hello", " hello", "\n\nhello", "  \n x \n", "", "\n", "def f():\n    return 1\n"]


@pytest.mark.parametrize("reply", REPLIES)
def test_a_past_reply_renders_as_generated_after_the_generation_prompt(reply):
    prompt = apply_chat_template(HISTORY, add_generation_prompt=True)
    after = apply_chat_template(HISTORY + [{"role": "assistant", "content": reply}])
    assert after == prompt + reply + "<|endoftext|>"
    # and the next turn extends it
    follow = HISTORY + [{"role": "assistant", "content": reply}, {"role": "user", "content": "and?"}]
    assert apply_chat_template(follow, add_generation_prompt=True).startswith(after)


def test_continue_final_message_leaves_the_reply_open():
    prompt = apply_chat_template(HISTORY, add_generation_prompt=True)
    messages = HISTORY + [{"role": "assistant", "content": "\n\nso"}]
    assert apply_chat_template(messages, continue_final_message=True) == prompt + "\n\nso"


def test_text_parts_are_joined_and_bad_input_named():
    parts = [{"type": "text", "text": "a"}, {"type": "image"}, {"type": "text", "text": "b"}]
    assert apply_chat_template([{"role": "user", "content": parts}]) == "User: ab\n\n"
    with pytest.raises(ValueError, match="unknown role 'robot'"):
        apply_chat_template([{"role": "robot", "content": "x"}])
    with pytest.raises(ValueError, match="Only one of"):
        apply_chat_template(HISTORY, add_generation_prompt=True, continue_final_message=True)
