"""The paper-model examples run end to end (a handful of steps, tiny sizes) and learn."""

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
from mlx_lm.utils import load_model

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
    if importlib.util.find_spec("matplotlib"):
        assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_tiny_lm_example(tmp_path):
    folder = tmp_path / "tiny"
    stdout = run("paper_tiny_lm.py", "--steps", "6", "--context", "16", "--dims", "32", "--batch", "8",
                 "--lr", "1e-2", "--sample-tokens", "8", "--save", str(folder))
    before, after = before_after(stdout, "valid loss")
    assert after < before
    assert "sample: 'def " in stdout
    model, _ = load_model(folder)
    assert isinstance(model, Model) and model.args.block_map == [0, 1]
    assert model(mx.array([[100, 101, 102]])).shape == (1, 3, 256)
