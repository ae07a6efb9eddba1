"""A fresh interpreter that imports only mlx_lm sees the `xlstm` model type."""

import subprocess
import sys
import sysconfig
from pathlib import Path

import mlx_lm_xlstm

from conftest import greedy_checked, needs_torch
from helpers import fixtures


def python(code: str, *flags: str) -> str:
    return subprocess.run(
        [sys.executable, *flags, "-c", code], capture_output=True, text=True, check=True, timeout=120
    ).stdout.strip()


def test_hook_is_light_and_resolves_lazily():
    out = python(
        "import sys; before = 'mlx' in sys.modules; import mlx_lm.models.xlstm as m; "
        "import mlx_lm_xlstm.xlstm as ours; print(before, m is ours)"
    )
    assert out == "False True"


def test_importing_the_package_registers_without_site():
    """`python -S` skips .pth files: importing the package by hand registers it."""
    paths = [sysconfig.get_paths()["purelib"], str(Path(mlx_lm_xlstm.__file__).parent.parent)]
    out = python(
        f"import sys; sys.path[:0] = {paths!r}; import mlx_lm_xlstm; "
        "import mlx_lm.models.xlstm as m; print(m.Model.__module__)",
        "-S",
    )
    assert out == "mlx_lm_xlstm.xlstm"


def generate(folder, prompt: str, max_tokens: int) -> str:
    out = subprocess.run(
        [sys.executable, "-m", "mlx_lm", "generate", "--model", str(folder), "--prompt", prompt,
         "--max-tokens", str(max_tokens), "--temp", "0", "--ignore-chat-template"],
        capture_output=True, text=True, check=True, timeout=300,
    ).stdout
    return out[out.index("==========\n") + 11 : out.rindex("\n==========")]


def test_cli_generate_runs_our_model(model_folder):
    """`python -m mlx_lm generate` (registration through the .pth alone) prints our model's greedy text."""
    from mlx_lm import load

    model, tokenizer = load(str(model_folder))
    text = generate(model_folder, "def main", 8)
    assert text and text == greedy_checked(model, tokenizer, "def main", 8)


@needs_torch
def test_cli_greedy_tokens_equal_transformers(tmp_path):
    import torch
    from transformers import AutoTokenizer

    ref = fixtures.save_reference(tmp_path, seed=3, extra_config={"force_bos_token_insert": True})
    tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    prompt = "def main(self):"
    ids = [0] + tokenizer.encode(prompt)
    with torch.no_grad():
        expected = ref.generate(
            torch.tensor([ids]), max_new_tokens=12, do_sample=False, eos_token_id=0, pad_token_id=1, use_cache=False
        )[0, len(ids):].tolist()
    expected = [t for t in expected if t != 0]  # mlx-lm does not print the EOS token
    assert generate(tmp_path, prompt, 12) == tokenizer.decode(expected)


def test_the_wheel_carries_the_hook(tmp_path):
    """A wheel install (not only an editable one) puts the .pth at site-packages' root."""
    root = Path(mlx_lm_xlstm.__file__).parent.parent
    # Offline: the environment's hatchling (the test extra), no index.
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "--no-index",
                    "-w", tmp_path / "dist", root],
                   check=True, capture_output=True, timeout=300)
    wheel = next((tmp_path / "dist").glob("mlx_lm_xlstm-*.whl"))
    site_dir = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", site_dir, wheel],
                   check=True, capture_output=True, timeout=300)
    assert (site_dir / "mlx_lm_xlstm.pth").is_file()
    # -S: no .pth of this environment (nor our editable install) runs, only the wheel's;
    # sys.path[0] (the working directory, this repository) is dropped.
    out = python(
        f"import sys, site; sys.path[:] = [{sysconfig.get_paths()['purelib']!r}] + sys.path[1:]; "
        f"site.addsitedir({str(site_dir)!r}); import mlx_lm.models.xlstm as m; print(m.__file__)",
        "-S",
    )
    assert out.startswith(str(site_dir))
