"""xLSTM-7b's config.json (Triton kernel names) must not stop mlx-lm's tokenizer loader."""

import json

from helpers import fixtures
from mlx_lm.utils import load_tokenizer
from transformers import AutoConfig

import mlx_lm_xlstm.xlstm  # noqa: F401  (what mlx-lm imports before loading the tokenizer)


def test_unknown_kernel_names_are_tolerated(tmp_path):
    folder = fixtures.model_dir(tmp_path / "m", "single")
    config = json.loads((folder / "config.json").read_text())
    config.update(chunkwise_kernel="chunkwise--triton_xl_chunk_v9", sequence_kernel="native_sequence__triton",
                  step_kernel="triton", eos_token_id=2)
    (folder / "config.json").write_text(json.dumps(config))
    assert AutoConfig.from_pretrained(folder).hidden_size == config["hidden_size"]
    assert load_tokenizer(folder, eos_token_ids=[0]).eos_token_ids == {0}
