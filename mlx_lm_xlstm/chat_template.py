"""A plain-text chat template for xLSTM base checkpoints, which ship none.

mlx-lm finds it as `mlx_lm.chat_templates.xlstm` (the registration hook aliases that
name here; `TOKENIZER_DEFAULTS["chat_template_type"]` in xlstm.py selects it), and
uses it only when the tokenizer has no template of its own.

A past assistant turn is "Assistant:", the reply exactly as generated (leading spaces and
newlines included) and <|endoftext|>, the token generation stops on. So the history rendered
in full is exactly the token stream a multi-turn session has already fed the model
(`mlx_lm.chat` keeps the recurrent state and sends only the new turn; the server finds the
previous turn's state as a cached prefix).
"""

END_OF_TURN = "<|endoftext|>"
GENERATION_PROMPT = "Assistant:"
ROLES = {"system": "System", "user": "User", "assistant": "Assistant", "tool": "Tool"}


def _text(content) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "".join(part["text"] for part in content if part.get("type") == "text")


def apply_chat_template(
    messages, add_generation_prompt=False, continue_final_message=False, **kwargs
) -> str:
    if continue_final_message and add_generation_prompt:
        raise ValueError("Only one of continue_final_message or add_generation_prompt can be True")
    out = ""
    for position, message in enumerate(messages):
        role = message["role"]
        if role not in ROLES:
            raise ValueError(f"xLSTM chat template: unknown role '{role}' (expected one of {list(ROLES)})")
        text = _text(message.get("content"))
        if role != "assistant":
            out += f"{ROLES[role]}: {text}\n\n"
        elif continue_final_message and position == len(messages) - 1:
            out += f"{GENERATION_PROMPT}{text}"
        else:
            out += f"{GENERATION_PROMPT}{text}{END_OF_TURN}"
    if add_generation_prompt:
        out += GENERATION_PROMPT
    return out
