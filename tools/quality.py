"""Perplexity of an xLSTM checkpoint converted by `mlx_lm convert` at several dtypes and bit widths,
against fp32, on one text. Prints a table.

    python tools/quality.py --model DIR         # any mlx-lm xLSTM folder
    python tools/quality.py                     # the embedded demo model, demo/xlstm-stdlib

Every variant goes through mlx-lm's own convert() and load(), and is scored with
mlx_lm.perplexity.eval_ppl on the same token windows (BOS first, as the model expects).
"""

import argparse
import contextlib
import io
import tempfile
import warnings
from pathlib import Path

import mlx.core as mx
import numpy as np

DEMO = Path(__file__).resolve().parent.parent / "demo" / "xlstm-stdlib"

VARIANTS = [  # name, convert() options
    ("fp32", dict(dtype="float32")),
    ("bf16", dict(dtype="bfloat16")),
    ("fp16", dict(dtype="float16")),
    ("8-bit g64", dict(quantize=True, q_bits=8, q_group_size=64)),
    ("4-bit g64", dict(quantize=True, q_bits=4, q_group_size=64)),
    ("4-bit g32", dict(quantize=True, q_bits=4, q_group_size=32)),
    ("4-bit g128", dict(quantize=True, q_bits=4, q_group_size=128)),
]


def default_text() -> str:
    """Python standard library source the demo model was not trained on first (shlex, string)."""
    import sysconfig

    lib = Path(sysconfig.get_paths()["stdlib"])
    return "\n".join((lib / n).read_text(encoding="utf-8") for n in ("shlex.py", "string.py"))


def windows(tokenizer, text: str, seq_len: int, count: int) -> mx.array:
    ids = tokenizer.encode(text)
    n = min(count, len(ids) // (seq_len - 1))
    if n == 0:
        raise ValueError(f"the text has {len(ids)} tokens, fewer than one window of {seq_len}")
    rows = np.array(ids[: n * (seq_len - 1)]).reshape(n, seq_len - 1)
    bos = np.full((n, 1), tokenizer.bos_token_id or 0)
    return mx.array(np.concatenate([bos, rows], axis=1))


def main():
    from mlx.utils import tree_flatten
    from mlx_lm.convert import convert
    from mlx_lm.perplexity import eval_ppl
    from mlx_lm.utils import load

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=DEMO, help="an mlx-lm xLSTM folder (default: %(default)s)")
    parser.add_argument("--text", type=Path, help="a text file (default: stdlib shlex.py + string.py)")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--windows", type=int, default=8)
    args = parser.parse_args()

    model_path = args.model
    with tempfile.TemporaryDirectory() as tmp:
        text = args.text.read_text() if args.text else default_text()
        _, tokenizer = load(str(model_path))
        data = windows(tokenizer, text, args.seq_len, args.windows)

        rows, reference = [], None
        for name, options in VARIANTS:
            out = Path(tmp) / name.replace(" ", "_")
            with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                convert(str(model_path), str(out), **options)
                model, _ = load(str(out))
                ppl, se = eval_ppl(model, data, batch_size=4)
            params = dict(tree_flatten(model.parameters()))
            size = sum(v.nbytes for v in params.values())
            reference = reference or ppl
            note = "float: " + str(caught[0].message).split(": ", 1)[1].split(";")[0] if caught else ""
            rows.append((name, size / 2**20, ppl, se, 100 * (ppl / reference - 1), note))

    print(f"model {model_path}; {data.shape[0]} windows x {data.shape[1]} tokens")
    print("| variant | weights MiB | perplexity | ± | vs fp32 | note |")
    print("|---|---:|---:|---:|---:|---|")
    for name, mib, ppl, se, delta, note in rows:
        print(f"| {name} | {mib:.2f} | {ppl:.3f} | {se:.3f} | {delta:+.2f}% | {note} |")


if __name__ == "__main__":
    main()
