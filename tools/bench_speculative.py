"""Speculative decoding (mlx-lm's --draft-model) with xLSTM: what it costs and when it pays.

    python tools/bench_speculative.py                          # CPU: the demo and its draft, k = 1..6
    python tools/bench_speculative.py --shape 7b --json 7b.json   # GPU: xLSTM-7b's shape, random bf16 weights
    python tools/bench_speculative.py --shape tiny             # the same measurement at a tiny shape (a check)

Demo mode (default): `mlx_lm.generate` (its own CLI, in a subprocess) on a few prompts, plain
and with `--draft-model` for each k, greedy; its printed generation tok/s, the mean over the
prompts, and from mlx-lm's `stream_generate` on the same prompts (tokens checked against
plain greedy) the drafted tokens the target kept per round and the per-token acceptance
rate a that explains them (a round keeps a + a^2 + ... + a^k on average).

Shape mode: a random-weight xLSTM target (`tools/random_models.py`) and a small random
xLSTM draft with its vocabulary. Random weights make acceptance meaningless, so it measures
the parts of a round and puts them in the cost model of mlx-lm's loop:
  step ms       one decode step of the target (compiled, B=1): plain decoding's cost per token
  verify ms     the target's (k+1)-token call on a warm cache, then its trim (mlx-lm's round):
                all drafts accepted (trim 0) and the last one rejected (trim 1, the longest replay)
  draft ms      one decode step of the draft
  undo MiB      what the target's cache keeps for a trim after a verify call (one state + inputs)
A round with per-token acceptance rate a yields E = (1 - a^(k+1)) / (1 - a) tokens for
k * draft + verify; speed-up = E * step / (k * draft + verify); break-even: the a where it is 1.
The target as its own draft (a = 1, measured end to end over 32 tokens against plain
generation) checks the model against a run.
Every measurement runs once, errors are recorded in the JSON instead of ending the run.
"""

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import mlx.core as mx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))
from bench import timed  # noqa: E402

DEMO, DEMO_DRAFT = ROOT / "demo" / "xlstm-stdlib", ROOT / "demo" / "xlstm-stdlib-draft"
PROMPTS = ["    def __init__(self, name", "import os\n\n\ndef main(", "class Queue:\n    \"\"\"", "        for key, value in"]
KS = range(1, 7)
MiB = 1024**2


def cli_generate(model, prompt, max_tokens, draft=None, k=None):
    """`mlx_lm generate` greedy: (text, generation tok/s it prints)."""
    args = [sys.executable, "-m", "mlx_lm", "generate", "--model", str(model), "--prompt", prompt,
            "--max-tokens", str(max_tokens), "--ignore-chat-template", "--temp", "0"]
    if draft is not None:
        args += ["--draft-model", str(draft), "--num-draft-tokens", str(k)]
    out = subprocess.run(args, capture_output=True, text=True, check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}).stdout
    tok_s = float(re.search(r"Generation: \d+ tokens, ([\d.]+) tokens-per-sec", out).group(1))
    return out.split("==========\n")[1].rsplit("\n", 1)[0], tok_s


def acceptance(model, draft, tokenizer, prompt, k, max_tokens):
    """(drafted tokens the target kept per round, the tokens) of one greedy run."""
    from mlx_lm import stream_generate

    responses = list(stream_generate(model, tokenizer, prompt, max_tokens=max_tokens, draft_model=draft, num_draft_tokens=k))
    accepted = sum(r.from_draft for r in responses)
    rounds = len(responses) - accepted  # each round ends with one token of the target's own
    return accepted / max(rounds, 1), [r.token for r in responses]


def per_token_rate(kept_per_round, k):
    """The a for which a round keeps a + a^2 + ... + a^k drafted tokens on average (each kept
    only if those before it were), the acceptance rate of the cost model."""
    lo, hi = 0.0, 1.0
    for _ in range(50):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if sum(mid**j for j in range(1, k + 1)) < kept_per_round else (lo, mid)
    return lo


def demo_rows(model_dir, draft_dir, max_tokens, repeat):
    from mlx_lm import load, stream_generate

    model, tokenizer = load(str(model_dir))
    draft, _ = load(str(draft_dir))
    rows = []
    plain_tok_s = []
    plain_tokens = {}
    for prompt in PROMPTS:
        plain_tokens[prompt] = [r.token for r in stream_generate(model, tokenizer, prompt, max_tokens=max_tokens)]
        plain_tok_s.append(max(cli_generate(model_dir, prompt, max_tokens)[1] for _ in range(repeat)))
    plain = sum(plain_tok_s) / len(plain_tok_s)
    rows.append(dict(k=0, tok_s=round(plain, 1), speedup=1.0))
    print(f"plain: {plain:.1f} tok/s", flush=True)
    for k in KS:
        rates, speeds, same = [], [], True
        for prompt in PROMPTS:
            rate, tokens = acceptance(model, draft, tokenizer, prompt, k, max_tokens)
            rates.append(rate)
            same &= tokens == plain_tokens[prompt]
            speeds.append(max(cli_generate(model_dir, prompt, max_tokens, draft_dir, k)[1] for _ in range(repeat)))
        tok_s, kept = sum(speeds) / len(speeds), sum(rates) / len(rates)
        row = dict(k=k, kept_per_round=round(kept, 2), acceptance_rate=round(per_token_rate(kept, k), 3),
                   tok_s=round(tok_s, 1), speedup=round(tok_s / plain, 2), same_tokens_as_plain=same)
        rows.append(row)
        print(row, flush=True)
    return rows


def median_ms(fn, n):
    return 1e3 * timed(fn, repeat=n)


def warm_cache(model, prompt_len=64):
    from mlx_lm.models.cache import make_prompt_cache

    cache = make_prompt_cache(model)
    model(mx.random.randint(2, model.args.vocab_size, (1, prompt_len)), cache=cache)
    mx.eval([c.cache for c in cache])
    return cache


def step_ms(model, n):
    cache = warm_cache(model)
    y = mx.array([[5]])

    def step():
        mx.eval(model(y, cache=cache))

    return median_ms(step, n)


def verify_ms(model, k, rejected, n):
    """The target's part of one round: a (k+1)-token call, then the trim of `rejected` drafts
    (0: nothing to replay; 1: the most, k tokens replayed from the state before the call)."""
    from mlx_lm.models.cache import trim_prompt_cache

    cache = warm_cache(model)
    y = mx.random.randint(2, model.args.vocab_size, (1, k + 1))

    def round_():
        logits = model(y, cache=cache)
        trim_prompt_cache(cache, rejected)
        mx.eval(logits, [c.cache for c in cache])

    return median_ms(round_, n)


def undo_bytes(model, k):
    cache = warm_cache(model)
    state = sum(x.nbytes for c in cache for x in c.cache)
    model(mx.random.randint(2, model.args.vocab_size, (1, k + 1)), cache=cache)
    mx.eval([c.cache for c in cache])
    return state, sum(c.nbytes for c in cache) - state


def speedup(a, k, step, draft, verify):
    tokens = k + 1 if a >= 1 else (1 - a ** (k + 1)) / (1 - a)
    return tokens * step / (k * draft + verify)


def break_even(k, step, draft, verify):
    """The per-token acceptance rate where a round is as fast as plain decoding (None: never)."""
    lo, hi = 0.0, 1.0
    if speedup(hi, k, step, draft, verify) < 1:
        return None
    for _ in range(50):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if speedup(mid, k, step, draft, verify) < 1 else (lo, mid)
    return hi


def generated_tok_s(model, max_tokens, k=None):
    """End to end through mlx-lm's loop: plain, or the target as its own draft (every draft kept)."""
    from mlx_lm.generate import generate_step, speculative_generate_step

    prompt = mx.random.randint(2, model.args.vocab_size, (32,))

    def run(n):
        steps = (generate_step(prompt, model, max_tokens=n) if k is None
                 else speculative_generate_step(prompt, model, model, num_draft_tokens=k, max_tokens=n))
        t = time.perf_counter()
        count = sum(1 for _ in steps)
        return count / (time.perf_counter() - t)

    run(2 * (k or 1) + 4)  # traces: the verify call's length, the draft's 2-token call
    return run(max_tokens)


def attempt(record, name, fn):
    try:
        record[name] = fn()
    except Exception as e:  # one try: the rest of the run still reports
        record[name] = f"error: {type(e).__name__}: {e}"
        print(f"{name}: {record[name]}", flush=True)
    return record[name]


def shape_report(report, shape, dtype, draft_shape, steps, save):
    """Fills `report` (saved after every row: a run cut short still leaves its numbers)."""
    from random_models import random_xlstm, xlstm_config

    report.update(shape=shape, draft_shape=draft_shape, dtype=str(dtype), device=str(mx.default_device()), rows=[])
    config = xlstm_config(shape)
    model = random_xlstm(config, dtype)
    draft_config = {**xlstm_config(draft_shape), "vocab_size": config["vocab_size"]}
    draft = random_xlstm(draft_config, dtype, seed=1)
    mx.eval(model.parameters(), draft.parameters())
    step = attempt(report, "step_ms", lambda: step_ms(model, steps))
    draft_step = attempt(report, "draft_step_ms", lambda: step_ms(draft, steps))
    plain_tok_s = attempt(report, "plain_tok_s", lambda: generated_tok_s(model, 32))
    print(f"step {step} ms, draft step {draft_step} ms, plain {plain_tok_s} tok/s", flush=True)
    save(report)
    for k in KS:
        row = dict(k=k)
        attempt(row, "verify_all_accepted_ms", lambda: verify_ms(model, k, 0, steps))
        attempt(row, "verify_last_rejected_ms", lambda: verify_ms(model, k, 1, steps))
        state_and_undo = attempt(row, "state_and_undo_bytes", lambda: undo_bytes(model, k))
        if isinstance(state_and_undo, tuple):
            row["state_MiB"], row["undo_MiB"] = (round(b / MiB, 2) for b in state_and_undo)
        verify = row["verify_last_rejected_ms"]  # the longest replay: the cost model's bound
        if all(isinstance(x, float) for x in (step, draft_step, verify)):
            row["verify_over_step"] = round(verify / step, 2)
            row["verify_over_k_steps"] = round(verify / (k * step), 2)
            row["speedup_at"] = {f"{a:.1f}": round(speedup(a, k, step, draft_step, verify), 2)
                                 for a in (0.5, 0.6, 0.7, 0.8, 0.9, 1.0)}
            row["break_even_acceptance"] = break_even(k, step, draft_step, verify)
            if row["break_even_acceptance"] is not None:
                row["break_even_acceptance"] = round(row["break_even_acceptance"], 3)
        self_draft = attempt(row, "self_draft_tok_s", lambda: generated_tok_s(model, 32, k))
        accepted_verify = row["verify_all_accepted_ms"]
        if all(isinstance(x, float) for x in (self_draft, plain_tok_s, step, accepted_verify)):
            row["self_draft_measured_speedup"] = round(self_draft / plain_tok_s, 2)
            row["self_draft_model_speedup"] = round(speedup(1.0, k, step, step, accepted_verify), 2)
        report["rows"].append({key: (round(v, 3) if isinstance(v, float) else v) for key, v in row.items()})
        print(report["rows"][-1], flush=True)
        save(report)


def write_json(path, report):
    """Whole or not at all: written beside the target and renamed."""
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    tmp.replace(path)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=["tiny", "small", "7b"], help="random-weight cost model instead of the demo")
    p.add_argument("--draft-shape", default=None, help="the draft's shape (default: tiny, 'small' for 7b)")
    p.add_argument("--dtype", choices=["bfloat16", "float32"], default=None, help="default bf16 for 7b, else fp32")
    p.add_argument("--steps", type=int, default=20, help="timed repetitions of each call")
    p.add_argument("--model", type=Path, default=DEMO)
    p.add_argument("--draft-model", type=Path, default=DEMO_DRAFT)
    p.add_argument("--max-tokens", type=int, default=200)
    p.add_argument("--repeat", type=int, default=2, help="CLI runs per prompt and k (best is kept)")
    p.add_argument("--json", type=Path)
    a = p.parse_args(argv)
    save = (lambda report: write_json(a.json, report)) if a.json else (lambda report: None)
    report = {}
    if a.shape:
        dtype = getattr(mx, a.dtype or ("bfloat16" if a.shape == "7b" else "float32"))
        draft_shape = a.draft_shape or ("small" if a.shape == "7b" else "tiny")
        attempt(report, "error", lambda: shape_report(report, a.shape, dtype, draft_shape, a.steps, save))
        if report["error"] is None:
            del report["error"]
    else:
        report = dict(model=str(a.model), draft=str(a.draft_model), max_tokens=a.max_tokens, prompts=PROMPTS,
                      device=str(mx.default_device()), rows=demo_rows(a.model, a.draft_model, a.max_tokens, a.repeat))
    save(report)


if __name__ == "__main__":
    main()
