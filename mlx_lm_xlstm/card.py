"""The model card of a converted xLSTM folder: what `python -m mlx_lm_xlstm.convert --upload-repo`
and `upload_scripts/publish.py` upload, instead of mlx-lm's generic card (its `pip install mlx-lm`
alone cannot load an xLSTM).

The front matter is huggingface_hub's ModelCardData; the body says how to install this plugin
(from the repository today, from the package index once released) and how to run the model.
"""

from huggingface_hub import ModelCard, ModelCardData

from .info import human_bytes

TAGS = ["mlx", "xlstm", "mlstm", "recurrent", "mlx-lm-xlstm"]

# The package is not on the package index yet: a clone of the repository installs it today.
INSTALL = """\
# today: from a clone of the mlx-lm-xlstm repository (Linux CPU: ".[cpu]", NVIDIA: ".[cuda13]")
pip install -e .
# once released on the package index
pip install mlx-lm-xlstm"""


def card_data(base_model=None, license_meta: dict = None, tags=()) -> ModelCardData:
    return ModelCardData(
        base_model=base_model, library_name="mlx", pipeline_tag="text-generation",
        tags=TAGS + [t for t in tags if t not in TAGS], **(license_meta or {}),
    )


def model_card(repo_id: str, info: dict, description: str, base_model=None, license_meta: dict = None,
               tags=(), prompt: str = "The capital of France is", extra: str = "") -> ModelCard:
    """The card of the folder `info` describes (`mlx_lm_xlstm.info.describe`); `description`
    says what the weights are (dtype, quantization), `extra` is appended (e.g. measurements)."""
    import mlx_lm

    from . import __version__

    a = info["architecture"]
    blocks = " + ".join(f"{b['count']} {b['kind']}" for b in info["state_blocks"])
    origin = f"[{base_model}](https://huggingface.co/{base_model})" if base_model else "An xLSTM checkpoint"
    text = f"""
# {repo_id}

{origin} converted to MLX: {description}.
Converted with mlx-lm {mlx_lm.__version__}'s `convert` and mlx-lm-xlstm {__version__}, the plugin that teaches mlx-lm the `xlstm` model type.

xLSTM is a recurrent language model (mLSTM blocks: matrix memory with exponential gating; the
paper's stacks also have sLSTM blocks): its state per sequence has a constant size whatever the
context, {human_bytes(info['state_bytes'])} in fp32 over {blocks} blocks.

| | |
|---|---|
| parameters | {info['parameters']:,} |
| blocks | {blocks} |
| hidden size | {a.get('hidden_size', a.get('embedding_dim'))} |
| weights | {human_bytes(info['weight_bytes'])} |
| state per sequence | {human_bytes(info['state_bytes'])} (fp32) |

## Use

```bash
{INSTALL}
mlx_lm.generate --model {repo_id} --ignore-chat-template --prompt "{prompt}"
```

`--ignore-chat-template` gives raw completion; without it mlx-lm wraps the prompt in the plugin's
plain chat template (`User: …` / `Assistant:`), as `mlx_lm.chat` and the server's chat
completions use it.

```python
from mlx_lm import load, generate

model, tokenizer = load("{repo_id}")
print(generate(model, tokenizer, prompt="{prompt}", max_tokens=100))
```

The plugin registers itself on install (no import needed); the model inserts its BOS token
(`<|endoftext|>`, id 0) itself and stops on it.
{extra}"""
    return ModelCard(f"---\n{card_data(base_model, license_meta, tags).to_yaml()}\n---\n{text}")


def weights_description(info: dict) -> str:
    """e.g. "4-bit affine quantization, group size 64" or "bfloat16 weights (unquantized)"."""
    q = info["quantization"]
    if not q:
        return f"{info['dtype']} weights (unquantized)"
    return f"{q['bits']}-bit {q.get('mode', 'affine')} quantization, group size {q['group_size']}"
