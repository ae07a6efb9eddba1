"""Start-up as users meet it, xLSTM against a llama of the same size, through mlx-lm's own CLIs.

    python tools/bench_startup.py --dir /tmp/startup --shape 7b --json startup.json   # GPU
    python tools/bench_startup.py --dir /tmp/startup --shape tiny                      # CPU

Writes DIR/xlstm and DIR/llama (random weights, one tokenizer; tools/random_models.py) unless
there, then for each model:
  generate   fresh `mlx_lm generate --verbose True` processes, one prompt of --prompt-tokens:
             "first run" with every cache the fast path writes empty (MLX's kernel caches,
             MLX_PTX_CACHE_DIR and the temp folder, and this package's, MLX_XLSTM_CACHE_DIR),
             "later run" with those folders as the first run left them (after the xLSTM's
             background kernel build, which the first run starts, is done); the xLSTM also with
             MLX_XLSTM_KERNELS=0. Time to first token = prompt tokens / prompt tok/s. The
             session and the server below start from the folders as these runs left them.
  session    one process (`session` below): prompts of new lengths, each then repeated
             (per-request time to first token), chat turns on one prompt cache as
             `mlx_lm chat` keeps it, and `batch_generate` on 16 ragged prompts whose requests
             finish at different steps (the batch shrinks), a first and a second call.
  server     `mlx_lm server`: one 8-token request (loads the model), then 16 concurrent
             streaming requests of different lengths (cold: their lengths and batch sizes
             are new to the process), 16 more (warm), then 4 one by one.
The `ratios` object: ttft_first_run_vs_llama, ttft_later_run_vs_llama, new_length_vs_repeated
(xLSTM; median over the lengths), server16_vs_llama (warm aggregate tok/s, xLSTM / llama).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

# mlx-lm's CLI as `python -m mlx_lm` runs it, torch hidden (transformers imports it when it can,
# 2.5 s a start; neither model needs it): both models' processes start the same way.
RUN_CLI = (
    "import runpy, sys; sys.modules['torch'] = None; sys.argv = ['mlx_lm'] + sys.argv[1:]; "
    "runpy.run_module('mlx_lm', run_name='__main__')"
)
ENV = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
PROMPT_FILES = ("json/decoder.py", "ast.py", "inspect.py", "typing.py")  # not the tokenizer's training text


def prompt_text(folder: Path, n_tokens: int, offset: int = 0) -> str:
    """About n_tokens of standard-library source, from token `offset` on."""
    import sysconfig
    from tokenizers import Tokenizer

    lib = Path(sysconfig.get_paths()["stdlib"])
    text = "\n".join((lib / f).read_text(encoding="utf-8") for f in PROMPT_FILES)
    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    ids = tok.encode(text).ids
    if offset + n_tokens > len(ids):
        raise ValueError(f"prompt source holds {len(ids)} tokens, asked for {offset + n_tokens}")
    return tok.decode(ids[offset : offset + n_tokens])


def cache_env(root: Path) -> dict:
    """Every on-disk cache the fast path can write, under `root`: MLX's CUDA kernels, this
    package's kernels and checks, the driver's, and MLX's CPU kernels (in the temp folder)."""
    (root / "tmp").mkdir(parents=True, exist_ok=True)
    return {
        "MLX_PTX_CACHE_DIR": str(root / "mlx_ptx"),
        "MLX_XLSTM_CACHE_DIR": str(root / "mlx_lm_xlstm"),
        "CUDA_CACHE_PATH": str(root / "nv"),
        "TMPDIR": str(root / "tmp"),
    }


def cached_files(root: Path) -> int:
    return sum(1 for p in root.rglob("*") if p.is_file()) if root.exists() else 0


def parse_verbose(out: str) -> dict:
    """`Prompt: N tokens, X tokens-per-sec` and `Generation: ...` of mlx_lm generate --verbose."""
    row = {}
    for line in out.splitlines():
        for key in ("Prompt", "Generation"):
            if line.startswith(key + ":"):
                n, tps = line.split(":", 1)[1].split(",")[:2]
                row[f"{key.lower()}_tokens"] = int(n.split()[0])
                row[f"{key.lower()}_tok_s"] = float(tps.split()[0])
        if line.startswith("Peak memory:"):
            row["peak_GB"] = float(line.split(":")[1].split()[0])
    if "prompt_tok_s" in row:
        row["ttft_s"] = row["prompt_tokens"] / row["prompt_tok_s"]
    return row


def generate_once(folder: Path, prompt: str, caches: Path, max_tokens: int, extra_env=None) -> dict:
    env = {**ENV, **cache_env(caches), **(extra_env or {})}
    cmd = [sys.executable, "-c", RUN_CLI, "generate", "--model", str(folder), "--prompt", "-",
           "--max-tokens", str(max_tokens), "--verbose", "True", "--ignore-chat-template"]
    start = time.perf_counter()
    proc = subprocess.run(cmd, input=prompt, capture_output=True, text=True, env=env, timeout=900)
    if proc.returncode:
        raise RuntimeError(f"mlx_lm generate failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return {**parse_verbose(proc.stdout), "process_s": time.perf_counter() - start,
            "cached_files_after": cached_files(caches), "warnings": [l for l in proc.stderr.splitlines() if "arn" in l][:5]}


def wait_for_background_build(caches: Path, timeout: float = 900) -> float:
    """Seconds until the kernels' background build that an xLSTM first run starts
    (mlx_lm_xlstm.warm_up) is done: a later run is one on a machine that has them."""
    start = time.perf_counter()
    while any(caches.rglob("warm-up/*.lock")) and time.perf_counter() - start < timeout:
        time.sleep(0.5)
    return time.perf_counter() - start


def generate_rows(folder: Path, name: str, prompt: str, caches: Path, max_tokens: int, variants) -> dict:
    """First run (`caches` fresh), then a later run on what it left."""
    rows = {"first_run": generate_once(folder, prompt, caches, max_tokens)}
    rows["first_run"]["background_build_s_after"] = wait_for_background_build(caches)
    rows["later_run"] = generate_once(folder, prompt, caches, max_tokens)
    for label, env in variants.items():
        rows[label] = generate_once(folder, prompt, caches, max_tokens, env)
    for label, row in rows.items():
        print(f"  generate {name} {label}: " + ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}"
                                                       for k, v in row.items() if k != "warnings"), flush=True)
    return rows


# ---- one process: lengths, chat turns, batch_generate (`session` subcommand) ---------------


def session(folder: Path, lengths, batch_lengths, turns) -> dict:
    import mlx.core as mx
    from mlx_lm import batch_generate, load, stream_generate
    from mlx_lm.models.cache import make_prompt_cache

    start = time.perf_counter()
    model, tokenizer = load(str(folder))
    out = {"load_s": time.perf_counter() - start}
    vocab = len(tokenizer.vocab) if hasattr(tokenizer, "vocab") else 2048
    tokens = lambda n, seed: mx.random.randint(2, vocab, (n,), key=mx.random.key(seed)).tolist()

    def ttft(prompt, cache=None, max_tokens=1):
        t = time.perf_counter()
        for r in stream_generate(model, tokenizer, prompt, max_tokens=max_tokens, prompt_cache=cache):
            if r.generation_tokens == 1:
                first = time.perf_counter() - t
        return first

    # Per-request time to first token: each length new, then the same length again (new tokens).
    rows = []
    for j, n in enumerate(lengths):
        new = ttft(tokens(n, 2 * j))
        repeated = ttft(tokens(n, 2 * j + 1))
        rows.append({"prompt_tokens": n, "new_length_s": new, "repeated_s": repeated, "ratio": new / repeated})
        print(f"  session length {n}: new {new:.3f} s, repeated {repeated:.3f} s", flush=True)
    out["lengths"] = rows
    out["new_length_vs_repeated_median"] = statistics.median(r["ratio"] for r in rows[1:] or rows)
    out["new_length_vs_repeated_max"] = max(r["ratio"] for r in rows[1:] or rows)

    # Chat: one prompt cache across turns; each turn sends only its new tokens, of a new length.
    cache = make_prompt_cache(model)
    out["chat_turns"] = []
    for j, n in enumerate(turns):
        t = time.perf_counter()
        first, count = None, 0
        for r in stream_generate(model, tokenizer, tokens(n, 100 + j), max_tokens=24, prompt_cache=cache):
            count += 1
            if first is None:
                first = time.perf_counter() - t
        out["chat_turns"].append({"turn_tokens": n, "ttft_s": first, "turn_s": time.perf_counter() - t, "tokens": count})
        print(f"  session chat turn {j} ({n} tokens): ttft {first:.3f} s", flush=True)

    # batch_generate: 16 ragged prompts, requests finishing at different steps.
    prompts = [tokens(n, 200 + j) for j, n in enumerate(batch_lengths)]
    max_tokens = [64 + 8 * j for j in range(len(prompts))]
    out["batch_generate"] = []
    for call in ("first", "second"):
        t = time.perf_counter()
        stats = batch_generate(model, tokenizer, prompts, max_tokens=max_tokens).stats
        wall = time.perf_counter() - t
        out["batch_generate"].append({"call": call, "wall_s": wall, "prompt_tok_s": stats.prompt_tps,
                                      "generation_tok_s": stats.generation_tps,
                                      "generation_tokens": stats.generation_tokens})
        print(f"  session batch_generate {call}: {stats.generation_tps:.1f} tok/s, {wall:.2f} s", flush=True)
    out["peak_GB"] = mx.get_peak_memory() / 1e9
    return out


def session_rows(folder: Path, name: str, caches: Path, args) -> dict:
    out = Path(tempfile.mkstemp(suffix=".json", dir=caches.parent)[1])
    cmd = [sys.executable, __file__, "session", "--model", str(folder), "--out", str(out),
           "--prompt-tokens", str(args.prompt_tokens)]
    print(f"session {name}", flush=True)
    subprocess.run(cmd, env={**ENV, **cache_env(caches)}, check=True, timeout=900)
    return json.loads(out.read_text())


# ---- mlx_lm server --------------------------------------------------------------------------


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stream_request(url: str, prompt: str, max_tokens: int) -> dict:
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0, "stream": True,
            "stream_options": {"include_usage": True}}
    request = urllib.request.Request(url + "/v1/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    start = time.perf_counter()
    first, chunks, usage = None, 0, None
    with urllib.request.urlopen(request, timeout=600) as response:
        for raw in response:
            line = raw.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[len("data: "):])
            if event.get("usage"):
                usage = event["usage"]
            if event.get("choices") and event["choices"][0].get("text"):
                chunks += 1
                if first is None:
                    first = time.perf_counter() - start
    end = time.perf_counter() - start
    tokens = usage["completion_tokens"] if usage else chunks
    return {"ttft_s": first, "total_s": end, "completion_tokens": tokens,
            "decode_tok_s": (tokens - 1) / (end - first) if first and tokens > 1 else None}


def concurrent_round(url, prompts, max_tokens) -> dict:
    results = [None] * len(prompts)

    def one(j):
        try:
            results[j] = stream_request(url, prompts[j], max_tokens)
        except Exception as e:  # counted, not fatal: the round reports how many failed
            results[j] = {"error": repr(e)[:300], "completion_tokens": 0, "ttft_s": None}

    start = time.perf_counter()
    threads = [threading.Thread(target=one, args=(j,)) for j in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    total = sum(r["completion_tokens"] for r in results)
    ttfts = [r["ttft_s"] for r in results if r["ttft_s"] is not None] or [float("nan")]
    return {"requests": len(prompts), "wall_s": wall, "completion_tokens": total, "aggregate_tok_s": total / wall,
            "ttft_s_median": statistics.median(ttfts), "ttft_s_max": max(ttfts),
            "errors": [r["error"] for r in results if "error" in r]}


def server_rows(folder: Path, name: str, caches: Path, args) -> dict:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = open(caches.parent / f"server-{name}.log", "w")
    proc = subprocess.Popen([sys.executable, "-c", RUN_CLI, "server", "--model", str(folder), "--host", "127.0.0.1",
                             "--port", str(port)], stdout=log, stderr=subprocess.STDOUT,
                            env={**ENV, **cache_env(caches)})
    try:
        import socket

        deadline = time.monotonic() + 300
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"mlx_lm server exited early; see {log.name}")
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError("mlx_lm server did not start")
                time.sleep(0.2)
        out = {"load_request": stream_request(url, prompt_text(folder, 8), 1)}
        n = args.server_requests
        lengths = [args.prompt_tokens // 16 + (args.prompt_tokens * j) // (n + 1) for j in range(n)]
        offsets = iter(range(0, 10**9, args.prompt_tokens + 64))
        for label in ("cold", "warm"):
            prompts = [prompt_text(folder, m, next(offsets)) for m in lengths]
            out[label] = concurrent_round(url, prompts, args.server_max_tokens)
            print(f"  server {name} {label}: {out[label]['aggregate_tok_s']:.1f} tok/s aggregate", flush=True)
        one_by_one = [stream_request(url, prompt_text(folder, m, next(offsets)), args.server_max_tokens)
                      for m in lengths[:: max(1, n // 4)][:4]]
        out["one_by_one"] = {
            "requests": len(one_by_one),
            "tok_s": sum(r["completion_tokens"] for r in one_by_one) / sum(r["total_s"] for r in one_by_one),
            "decode_tok_s_median": statistics.median([r["decode_tok_s"] for r in one_by_one if r["decode_tok_s"]] or [float("nan")]),
            "ttft_s": [r["ttft_s"] for r in one_by_one],
        }
        print(f"  server {name} one by one: {out['one_by_one']['tok_s']:.1f} tok/s", flush=True)
        return out
    finally:
        proc.kill()
        proc.wait(timeout=30)
        log.close()


# ---- all of it ------------------------------------------------------------------------------


def run(args, save=lambda result: None) -> dict:
    """All rows; `save(result)` after each model's, so that a run cut short keeps what it measured."""
    import random_models

    work = Path(args.dir)
    xlstm, llama = random_models.write_pair(work, args.shape, args.dtype)
    prompt = prompt_text(xlstm, args.prompt_tokens)
    result = {"shape": args.shape, "dtype": args.dtype, "prompt_tokens": args.prompt_tokens, "models": {}}
    for name, folder in (("llama", llama), ("xlstm", xlstm)):
        variants = {"later_run_kernels_off": {"MLX_XLSTM_KERNELS": "0"}} if name == "xlstm" else {}
        print(f"generate {name}", flush=True)
        # One cache folder per model: empty for its first run, then as the runs before left it.
        caches = Path(tempfile.mkdtemp(prefix=f"{name}-caches-", dir=work))
        rows = {"generate": generate_rows(folder, name, prompt, caches, args.max_tokens, variants)}
        if not args.skip_session:
            rows["session"] = session_rows(folder, name, caches, args)
        if not args.skip_server:
            print(f"server {name}", flush=True)
            rows["server"] = server_rows(folder, name, caches, args)
        result["models"][name] = rows
        save(result)
    result["ratios"] = ratios(result["models"])
    return result


def ratios(models: dict) -> dict:
    x, l = models["xlstm"], models["llama"]
    out = {
        "ttft_first_run_vs_llama": x["generate"]["first_run"]["ttft_s"] / l["generate"]["first_run"]["ttft_s"],
        "ttft_later_run_vs_llama": x["generate"]["later_run"]["ttft_s"] / l["generate"]["later_run"]["ttft_s"],
    }
    if "session" in x:
        out["new_length_vs_repeated"] = x["session"]["new_length_vs_repeated_median"]
        out["new_length_vs_repeated_llama"] = l["session"]["new_length_vs_repeated_median"]
    if "server" in x:
        out["server16_vs_llama"] = x["server"]["warm"]["aggregate_tok_s"] / l["server"]["warm"]["aggregate_tok_s"]
        out["server16_cold_vs_llama"] = x["server"]["cold"]["aggregate_tok_s"] / l["server"]["cold"]["aggregate_tok_s"]
        out["server_one_by_one_vs_llama"] = x["server"]["one_by_one"]["tok_s"] / l["server"]["one_by_one"]["tok_s"]
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", nargs="?", default="run", choices=("run", "session"))
    p.add_argument("--dir", default=None, help="where the model folders and caches go")
    p.add_argument("--shape", default="tiny")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--prompt-tokens", type=int, default=1550)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--server-requests", type=int, default=16)
    p.add_argument("--server-max-tokens", type=int, default=128)
    p.add_argument("--skip-session", action="store_true")
    p.add_argument("--skip-server", action="store_true")
    p.add_argument("--json", default=None)
    p.add_argument("--model", help="session: the model folder")
    p.add_argument("--out", help="session: where its JSON goes")
    a = p.parse_args()
    if a.command == "session":
        n = a.prompt_tokens
        lengths = [n - 1, n * 5 // 6, n * 2 // 3, n // 2, n // 3, n // 5]
        batch = [n // 5 + (n // 4 * j) // 15 for j in range(16)]  # ragged, ~0.2n to ~0.45n
        turns = [n // 8, n // 20, n // 12, n // 30]
        Path(a.out).write_text(json.dumps(session(Path(a.model), lengths, batch, turns), indent=1))
        return
    if a.dir is None:
        p.error("--dir is required")
    save = lambda result: a.json and Path(a.json).write_text(json.dumps(result, indent=1, default=str))
    result = run(a, save)
    save(result)
    print(json.dumps(result["ratios"], indent=1))


if __name__ == "__main__":
    main()
