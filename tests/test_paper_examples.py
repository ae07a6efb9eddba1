"""The paper-model examples run end to end (a handful of steps, tiny sizes) and learn."""

import re
import subprocess
import sys
from pathlib import Path

import matplotlib.image
import mlx.core as mx
import numpy as np
from helpers.cli import cli, generated_text
from mlx_lm import generate, load

from mlx_lm_xlstm.paper import Model

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def run(script, *args):
    out = subprocess.run([sys.executable, str(EXAMPLES / script), *args], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def before_after(stdout, what):
    m = re.search(rf"{what}: before ([\d.]+)\s+after ([\d.]+)", stdout) or re.search(
        rf"{what} before: ([\d.]+).*{what} after: ([\d.]+)", stdout, re.S)
    assert m, stdout
    return float(m.group(1)), float(m.group(2))


def test_sine_wave_example(tmp_path):
    plot = tmp_path / "fit.png"
    stdout = run("paper_sine_wave.py", "--steps", "6", "--length", "16", "--dims", "16", "--batch", "8",
                 "--lr", "1e-2", "--plot", str(plot))
    before, after = before_after(stdout, "test mse")
    assert after < before
    assert f"plot: {plot}" in stdout
    pixels = matplotlib.image.imread(plot)  # decodes: a PNG, 8 inches wide at 80 dpi
    assert pixels.shape[1] == 640 and pixels.shape[0] > 0
    # curves drawn on white: many colours, the two lines' among them
    colours = np.unique(pixels[..., :3].reshape(-1, 3), axis=0)
    assert len(colours) > 20 and (pixels[..., :3] < 0.9).mean() > 0.01


def test_tiny_lm_example(tmp_path):
    folder = tmp_path / "tiny"
    stdout = run("paper_tiny_lm.py", "--steps", "6", "--context", "16", "--dims", "32", "--batch", "8",
                 "--lr", "1e-2", "--sample-tokens", "8", "--save", str(folder))
    before, after = before_after(stdout, "valid loss")
    assert after < before
    assert "sample: 'def " in stdout
    # mlx-lm loads the folder, tokenizer included: one token per byte, any text round-trips
    model, tokenizer = load(str(folder))
    assert isinstance(model, Model) and model.args.block_map == [0, 1]
    text = "def f(x):\n\treturn 'é'"
    assert len(tokenizer.encode(text)) == len(text.encode()) and tokenizer.decode(tokenizer.encode(text)) == text
    assert model(mx.array([tokenizer.encode("def")])).shape == (1, 3, len(tokenizer)) == (1, 3, 258)
    # mlx_lm generate on the folder: the tokens the Python API gives
    cli_text = generated_text(cli("generate", "--model", folder, "--prompt", "def ", "--ignore-chat-template",
                                  "--max-tokens", "8").stdout)
    assert cli_text == generate(model, tokenizer, "def ", max_tokens=8)
