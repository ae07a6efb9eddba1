"""torch is for the tests only: nothing the plugin runs imports it.

mlx-lm itself imports transformers, which imports torch whenever it is installed (~1 s of a
2.2 s `load` on this machine; 1.2 s with torch hidden): that cost is mlx-lm's, not ours. These
tests check that no module of the plugin asks for torch, and that everything runs without it.
"""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FOLDERS = [ROOT / "demo" / "xlstm-stdlib", ROOT / "tests" / "fixtures" / "paper_mixed"]

# Records every `import torch...` made by a module of this package, then loads, runs and
# converts both architectures (xLSTM-7b's and the paper's) through mlx-lm.
SPY = """
import builtins, json, sys, tempfile
real, asked = builtins.__import__, []
def spy(name, globals=None, *args, **kwargs):
    importer = (globals or {}).get("__name__", "")
    if name.split(".")[0] == "torch" and importer.startswith("mlx_lm_xlstm"):
        asked.append(importer)
    return real(name, globals, *args, **kwargs)
builtins.__import__ = spy
import mlx.core as mx
from mlx_lm import generate, load
from mlx_lm.utils import load_model
from mlx_lm_xlstm import info
from mlx_lm_xlstm.convert import convert
demo, paper = sys.argv[1:3]
model, tokenizer = load(demo)
text = generate(model, tokenizer, "def main(", max_tokens=4)
paper_model, _ = load_model(__import__("pathlib").Path(paper))
mx.eval(paper_model(mx.array([[1, 2, 3]])))
info.describe(paper)
convert(hf_path=demo, mlx_path=tempfile.mkdtemp() + "/q", quantize=True, q_group_size=64)
print(json.dumps({"asked": asked, "text": text}))
"""


def run(prelude: str) -> dict:
    proc = subprocess.run([sys.executable, "-c", prelude + SPY, *map(str, FOLDERS)], capture_output=True,
                          text=True, timeout=120, env={"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_the_plugin_never_imports_torch():
    assert run("")["asked"] == []


def test_everything_runs_where_torch_is_absent():
    # sys.modules['torch'] = None: any `import torch` raises, as on a machine without it.
    hidden = run("import sys; sys.modules['torch'] = None\n")
    assert hidden["asked"] == [] and hidden["text"] == run("")["text"]
