import importlib.util
from functools import partial

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
