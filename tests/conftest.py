import importlib.util
import os
from functools import partial

# fp32 means fp32 here: MLX's CUDA backend runs fp32 matmuls in TF32 by default, which
# rounds a call of T tokens differently from calls of fewer (exactness tests compare them).
os.environ.setdefault("MLX_ENABLE_TF32", "0")
# The fast path from the first call, kernels built where needed (tests compare the two paths;
# tests/test_warm_up.py runs the background build of a first run on purpose).
os.environ.setdefault("MLX_XLSTM_WARM_UP", "0")

import pytest

from helpers import fixtures

HAS_TORCH = importlib.util.find_spec("torch") is not None
needs_torch = pytest.mark.skipif(not HAS_TORCH, reason="the live reference needs torch")


def load_fixture(name: str):
    """A committed transformers-written checkpoint, loaded through mlx-lm's own loader."""
    from mlx_lm.utils import load_model

    model, _ = load_model(fixtures.FIXTURES / name)
    return model


def compiled_train_step(model, optimizer, loss_fn):
    """MLX's compiled training step: loss_fn(model, batch) -> loss, the update in place."""
    import mlx.core as mx
    import mlx.nn as nn

    state = [model.state, optimizer.state]

    @partial(mx.compile, inputs=state, outputs=state)
    def step(batch):
        loss, grads = nn.value_and_grad(model, loss_fn)(model, batch)
        optimizer.update(model, grads)
        return loss

    return step


@pytest.fixture(scope="session")
def model_folder(tmp_path_factory):
    """A loadable folder with a tokenizer and NX-AI's BOS behaviour (the committed `single`
    checkpoint), shared by every test that only reads it."""
    return fixtures.model_dir(tmp_path_factory.mktemp("m") / "xlstm", "single", force_bos_token_insert=True)



def greedy_checked(model, tokenizer, prompt, max_tokens: int, tol: float = 1e-4) -> str:
    """mlx-lm's greedy generation (prefill, cache, step), each token checked against one pass
    over the whole sequence so far: its logit within `tol` of that pass's largest (low-precision
    weights round the two paths apart). Returns the text, as `generate` prints it."""
    import mlx.core as mx
    from mlx_lm import stream_generate

    ids = tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
    responses = list(stream_generate(model, tokenizer, ids, max_tokens=max_tokens))
    tokens = [r.token for r in responses]
    for n, token in enumerate(tokens):
        logits = model(mx.array([ids + tokens[:n]]))[0, -1].astype(mx.float32)
        assert (logits.max() - logits[token]).item() <= tol, (n, tokens)
    return "".join(r.text for r in responses)


def chat_prompt(tokenizer, text: str) -> list:
    """The tokens `mlx_lm generate --prompt text` feeds without --ignore-chat-template."""
    return tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)
