"""Side-by-side benchmark: mlx_lm_xlstm against transformers' xLSTM on the same shapes.

    python tools/bench.py --shape tiny            # CPU, seconds
    python tools/bench.py --shape 7b --reference peer,triton   # GPU: random 7B weights, bf16 + 8/4-bit decode
    python tools/bench.py --shape 7b --reference peer --mlx-lm DIR/xlstm --json 7b.json

Our side is the package's Model with random weights (no download). The reference side runs
only where torch sees a CUDA device: "peer" is NX-AI's xLSTMLarge with Triton kernels,
torch.compile and a CUDA graph per decode step (tools/bench_peer.py), "native"/"triton" are
transformers' xLSTMForCausalLM with its own or mlstm_kernels' Triton kernels. With --mlx-lm
FOLDER (a random-weight folder, tools/random_models.py), our side is also measured the way
users run it: `mlx_lm benchmark` (-p 8192 -g 64, -p 512 -g 256, -b 16 -p 512 -g 128) and
`batch_generate` on 16 ragged prompts; the JSON's `ratios` put those against the peer.
Numbers:
  prefill tok/s   whole prompt, fed in mlx-lm's 2048-token steps, state evaluated
                  ("ops": MLX_XLSTM_KERNELS=0, the plain uncompiled cell; "one pass": the
                  whole prompt in one call, as the reference side runs it)
  GEMM floor      every Linear of the model on the prompt's tokens (random inputs), all
                  evaluated together: the prefill ceiling with MLX's matmuls
  cell ms         the mLSTM cell alone over all layers for one 2048-token step, fused
                  chunk-state kernel and pure-MLX (compiled)
  step-loop tok/s the same prompt fed one token at a time (CPU shapes)
  decode tok/s    greedy steps, all sequences together (batch x steps / time): "compiled"
                  the model's own compiled decode step (what mlx-lm's loop gets), "eager"
                  the same step uncompiled, "ops" MLX_XLSTM_KERNELS=0 (plain pure-MLX)
  floor tok/s     MLX's bare matvec pass: every Linear of the model applied to a batch of
                  random vectors, all evaluated together, no recurrence (the decode ceiling)
  launches/layer  kernel launches per layer of one decode step (compiled) or one 2048-token
                  prefill step: the nodes of its graph (mx.export_to_dot) but views
  ops/layer       the same graph's nodes, views too: the host encodes each of them
  decode host ms  a compiled decode step as mlx-lm's loop runs it: the host's time to build
                  its graph and to encode it (mx.async_eval), beside the whole step
  decode cell us  one decode step's mLSTM cell per layer (step kernel where it applies),
                  beside a plain elementwise pass over the same states ("state pass": the
                  bytes the cell moves, at MLX's own kernel speed)
  peak GiB        mx.get_peak_memory() over that measurement
"""

import argparse
import gc
import json
import os
import platform
import re
import sys
import tempfile
import time

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))
from random_models import SHAPES, random_xlstm, xlstm_config  # noqa: E402
PREFILL_STEP = 2048  # mlx-lm's default prefill_step_size
GiB = 1024**3


def build_model(shape, dtype, bits=None):
    """Random weights (the gate projections fp32, as mlx-lm's --dtype leaves them), quantized
    by mlx-lm's own quantize_model (group 64) when bits is given."""
    from mlx_lm.utils import quantize_model

    config = xlstm_config(shape)
    model = random_xlstm(config, dtype)
    if bits:
        model, _ = quantize_model(model, config, 64, bits)
    mx.eval(model.parameters())
    return model


def weight_bytes(model):
    return sum(v.nbytes for _, v in tree_flatten(model.parameters()))


def state_bytes(cache):
    return sum(a.nbytes for c in cache for a in c.cache if a is not None)


def timed(fn, repeat=3):
    """Median seconds of fn() (fn evaluates its own results)."""
    fn()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


def with_peak(fn):
    mx.eval()
    gc.collect()
    mx.clear_cache()
    mx.reset_peak_memory()
    result = fn()
    return result, mx.get_peak_memory() / GiB


def tokens(B, T, vocab, seed=0):
    return mx.random.randint(0, vocab, (B, T), key=mx.random.key(seed))


def prefill(model, prompt, step=PREFILL_STEP):
    """Feed the prompt as mlx-lm does; return the last logits and the cache."""
    cache = model.make_cache()
    T = prompt.shape[1]
    for start in range(0, T - 1, step):
        model(prompt[:, start : min(start + step, T - 1)], cache=cache)
        mx.eval([c.cache for c in cache])
    logits = model(prompt[:, -1:], cache=cache)
    mx.eval(logits, [c.cache for c in cache])
    return logits, cache


def prefill_tok_s(model, T, repeat=3, step=PREFILL_STEP):
    prompt = tokens(1, T, model.args.vocab_size)
    t, peak = with_peak(lambda: timed(lambda: prefill(model, prompt, step), repeat))
    return T / t, peak


def activation_dtype(model):
    """The dtype the model's layers compute in (a quantized model's: its scales')."""
    return model.lm_head.scales.dtype if hasattr(model.lm_head, "scales") else model.lm_head.weight.dtype


def linears_pass_s(model, leading, repeat):
    """Seconds for every Linear of the model on random inputs of shape (*leading, its width),
    all evaluated together: the model's weight traffic and matmuls, nothing else."""
    layers = [m for _, m in model.named_modules() if isinstance(m, (nn.Linear, nn.QuantizedLinear))]
    dtype = activation_dtype(model)
    xs = []
    for j, layer in enumerate(layers):
        width = layer.weight.shape[1] * (32 // layer.bits if hasattr(layer, "bits") else 1)
        xs.append(mx.random.normal((*leading, width), key=mx.random.key(j)).astype(dtype))
    mx.eval(xs)
    return timed(lambda: mx.eval([layer(x) for layer, x in zip(layers, xs)]), repeat)


def gemm_floor_tok_s(model, T):
    """The prefill ceiling MLX's matmuls set: every Linear on T tokens."""
    return T / linears_pass_s(model, (1, T), repeat=3)


def cell_ms(model, T=PREFILL_STEP):
    """The mLSTM cell alone, over all layers, for one T-token step at the model's shapes,
    as `mlstm.mlstm_update` runs it (compiled; the chunk-state kernel where it applies)."""
    from mlx_lm_xlstm import kernels, mlstm

    a = model.args
    H, dtype = a.num_heads, model.lm_head.weight.dtype
    keys = mx.random.split(mx.random.key(3), 5)
    q, k = (mx.random.normal((1, H, T, a.qk_dim // H), key=keys[j]).astype(dtype) for j in (0, 1))
    v = mx.random.normal((1, H, T, a.v_dim // H), key=keys[2]).astype(dtype)
    i = mx.random.normal((1, H, T), key=keys[3])
    log_f = nn.log_sigmoid(3 + mx.random.normal((1, H, T), key=keys[4]))
    state = (mx.zeros((1, H, a.qk_dim // H, a.v_dim // H)), mx.zeros((1, H, a.qk_dim // H)), mx.zeros((1, H)))
    mx.eval(q, k, v, i, log_f, state)
    fused = kernels.chunk_states_kernel_applies(*state)
    cell = mlstm._compiled_chunkwise_fused if fused else mlstm._compiled_chunkwise
    run = lambda: mx.eval([cell(q, k, v, i, log_f, *state, chunk_size=a.chunk_size) for _ in model.layers])
    return 1e3 * timed(run)


def decode_cell_us(model, B):
    """One decode step's mLSTM cell at the model's shapes, per layer: `mlstm_update` on one
    token for every layer's state, in one compiled call, as the compiled decode step runs it;
    and a plain elementwise pass over the same states (C read and written once: the bytes the
    cell must move, at MLX's own kernel speed). Returns (cell us, state pass us)."""
    from mlx_lm_xlstm import mlstm

    a = model.args
    H, Dqk, Dv, L = a.num_heads, a.qk_dim // a.num_heads, a.v_dim // a.num_heads, len(model.layers)
    dtype = activation_dtype(model)
    keys = mx.random.split(mx.random.key(B), 5)
    q, k = (mx.random.normal((B, 1, H, Dqk), key=keys[j]).astype(dtype) for j in (0, 1))
    v = mx.random.normal((B, 1, H, Dv), key=keys[2]).astype(dtype)
    i, log_f = mx.random.normal((B, 1, H), key=keys[3]), -mx.abs(0.05 * mx.random.normal((B, 1, H), key=keys[4]))
    states = [(0.01 * mx.random.normal((B, H, Dqk, Dv)), mx.zeros((B, H, Dqk)), mx.zeros((B, H))) for _ in range(L)]
    mx.eval(q, k, v, i, log_f, states)
    cell = mx.compile(lambda states: [mlstm.mlstm_update(q, k, v, i, log_f, s)[1] for s in states])
    state_pass = mx.compile(lambda states: [(s[0] * 0.999 + 1e-3, s[1], s[2]) for s in states])
    us = lambda fn: 1e6 * timed(lambda: mx.eval(fn(states)), repeat=10) / L
    return us(cell), us(state_pass)


# Graph nodes that are views of their input, not kernels.
VIEWS = {"Reshape", "Flatten", "Unflatten", "Squeeze", "ExpandDims", "Transpose", "Slice", "Broadcast",
         "AsStrided", "Split", "StopGradient", "Depends"}


def graph_ops(outputs) -> list:
    """The ops (primitives) of the graph that evaluates `outputs`, by name: the host encodes
    each of them (a compiled function's fused elementwise run is one)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "graph.dot")
        mx.export_to_dot(path, *outputs)
        return re.findall(r'\[label ="(\w+)", shape=rectangle\]', open(path).read())


def launches(outputs) -> int:
    """Kernel launches in the graph that evaluates `outputs`: its ops but views (a matmul as
    one, whatever MLX splits it into)."""
    return sum(op not in VIEWS for op in graph_ops(outputs))


def ops_per_layer(model, T, B=1) -> dict:
    """Ops and kernel launches of one call on T tokens after a prompt (T = 1: the compiled
    decode step; T = PREFILL_STEP: a prefill step), each divided by the number of layers."""
    _, cache = prefill(model, tokens(B, 8, model.args.vocab_size, seed=B))
    logits = model(tokens(B, T, model.args.vocab_size, seed=T), cache=cache)
    ops = graph_ops([logits, *[a for c in cache for a in c.cache]])
    mx.eval(logits, [c.cache for c in cache])
    L = len(model.layers)
    return dict(ops=len(ops) / L, launches=sum(op not in VIEWS for op in ops) / L)


def launches_per_layer(model, T, B=1):
    return ops_per_layer(model, T, B)["launches"]


def decode_host_ms(model, B, steps=32) -> dict:
    """Host milliseconds of a compiled decode step, as mlx-lm's loop runs it (each step queued
    before the previous one is waited for): building its graph (the model call) and encoding
    it (`mx.async_eval`), beside the whole step. Build + encode near the step: the host sets
    the pace (MLX keeps at most 10 command buffers in flight)."""
    logits, cache = prefill(model, tokens(B, 8, model.args.vocab_size, seed=B))
    y = mx.argmax(logits[:, -1], axis=-1)[:, None]
    build = encode = 0.0
    start, previous = time.perf_counter(), None
    for j in range(steps + 4):
        if j == 4:
            build = encode = 0.0
            start = time.perf_counter()
        t = time.perf_counter()
        out = model(y, cache=cache)
        t1 = time.perf_counter()
        y = mx.argmax(out[:, -1], axis=-1)[:, None]
        mx.async_eval(y)
        build, encode = build + t1 - t, encode + time.perf_counter() - t1
        if previous is not None:
            mx.eval(previous)
        previous = y
    mx.eval(y)
    ms = lambda s: 1e3 * s / steps
    return dict(build_ms=ms(build), encode_ms=ms(encode), step_ms=ms(time.perf_counter() - start))


def step_loop_tok_s(model, T):
    prompt = tokens(1, T, model.args.vocab_size)

    def loop():
        cache = model.make_cache()
        for t in range(T):
            model(prompt[:, t : t + 1], cache=cache)
            mx.async_eval([c.cache for c in cache])
        mx.eval([c.cache for c in cache])

    return T / timed(loop, repeat=1)


def decode_tok_s(model, B, steps, mode):
    """Greedy decode, all sequences together. mode "compiled": the model's own call as
    mlx-lm's loop makes it (its compiled decode step, recurrent.CompiledDecode); "eager":
    the same step uncompiled (model.forward); "ops": MLX_XLSTM_KERNELS=0 (set by the caller)."""
    prompt = tokens(B, 8, model.args.vocab_size, seed=B)
    logits, cache = prefill(model, prompt)
    y = mx.argmax(logits[:, -1], axis=-1)[:, None]
    if mode == "eager":
        step = lambda y: model.forward(y, None, cache, fresh=False)
    else:
        step = lambda y: model(y, cache=cache)

    def run(n):
        nonlocal y
        for _ in range(n):
            y = mx.argmax(step(y)[:, -1], axis=-1)[:, None]
            mx.async_eval(y)
        mx.eval(y, [c.cache for c in cache])

    run(3)
    t = time.perf_counter()
    run(steps)
    elapsed = time.perf_counter() - t
    return B * steps / elapsed, mx.all(mx.isfinite(cache[0][0])).item()


def pipelined_greedy(model, cache, y, n):
    """n greedy tokens after y (B, 1) as mlx-lm's loop runs them: each step evaluated
    asynchronously while the previous one is awaited. Returns the last tokens and the seconds."""
    previous, start = None, time.perf_counter()
    for _ in range(n):
        y = mx.argmax(model(y, cache=cache)[:, -1], axis=-1)[:, None]
        mx.async_eval(y)
        if previous is not None:
            mx.eval(previous)
        previous = y
    mx.eval(y)
    return y, time.perf_counter() - start


def matvec_floor_tok_s(model, B):
    """The decode ceiling: one decode's worth of weight traffic (every Linear on B vectors)
    with no recurrence between layers."""
    return B / linears_pass_s(model, (B,), repeat=10)


def _no_chunk_kernel(fn):
    """The compiled pure-MLX chunkwise (kernels on otherwise)."""
    from mlx_lm_xlstm.kernels import chunk_states

    saved, chunk_states.kernel = chunk_states.kernel, None
    try:
        return with_kernels(True, fn)
    finally:
        chunk_states.kernel = saved


def with_kernels(on, fn):
    saved = os.environ.get("MLX_XLSTM_KERNELS")
    os.environ["MLX_XLSTM_KERNELS"] = "1" if on else "0"
    try:
        return fn()
    finally:
        if saved is None:
            del os.environ["MLX_XLSTM_KERNELS"]
        else:
            os.environ["MLX_XLSTM_KERNELS"] = saved


# ---- reference side: transformers (+ mlstm_kernels Triton) -------------------------------


def reference_rows(shape, lengths, batches, steps, wanted):
    try:
        import torch
        from transformers import xLSTMConfig, xLSTMForCausalLM
    except ImportError as e:
        return [emit(dict(system="transformers", note=f"not installed: {e}"))]
    if not torch.cuda.is_available():
        return [emit(dict(system="transformers", note="no CUDA device for torch"))]
    backends = {"native": {}}
    try:  # transformers takes the Triton kernels only through NX-AI's xlstm package
        import mlstm_kernels  # noqa: F401
        import xlstm  # noqa: F401

        backends["triton"] = dict(
            chunkwise_kernel="chunkwise--triton_limit_chunk",
            sequence_kernel="native_sequence__triton",
            step_kernel="triton",
        )
    except ImportError:
        pass
    rows = [emit(dict(system=f"transformers {k}", note="not installed")) for k in wanted if k not in backends]
    backends = {k: v for k, v in backends.items() if k in wanted}
    torch.manual_seed(0)
    for name, kernels in backends.items():
        config = xLSTMConfig(**SHAPES[shape])
        for key, value in kernels.items():  # names transformers' config validation does not list
            object.__setattr__(config, key, value)
        torch.set_default_dtype(torch.bfloat16)
        with torch.device("cuda"):
            model = xLSTMForCausalLM(config).eval()
        torch.set_default_dtype(torch.float32)
        row = dict(system=f"transformers {name}")
        with torch.no_grad():
            for T in lengths:
                ids = torch.randint(0, config.vocab_size, (1, T), device="cuda")

                def run(model=model, ids=ids):  # bound now: the loop deletes `model` later
                    model(ids, use_cache=True)
                    torch.cuda.synchronize()

                try:
                    torch.cuda.reset_peak_memory_stats()
                    row[f"prefill {T}"] = T / timed(run)
                    row[f"peak GiB prefill {T}"] = torch.cuda.max_memory_allocated() / GiB
                except Exception as e:  # the reference's own kernels may fail (Triton)
                    row[f"prefill {T}"] = f"failed: {type(e).__name__}: {str(e)[:80]}"
            for B in batches:
                try:
                    ids = torch.randint(0, config.vocab_size, (B, 8), device="cuda")
                    out = model(ids, use_cache=True)
                    cache = out.cache_params
                    y = out.logits[:, -1].argmax(-1, keepdim=True)
                    for n, record in ((3, False), (steps, True)):
                        torch.cuda.synchronize()
                        t = time.perf_counter()
                        for _ in range(n):
                            out = model(y, cache_params=cache, use_cache=True)
                            cache = out.cache_params
                            y = out.logits[:, -1].argmax(-1, keepdim=True)
                        torch.cuda.synchronize()
                        if record:
                            row[f"decode B={B}"] = B * steps / (time.perf_counter() - t)
                except Exception as e:
                    row[f"decode B={B}"] = f"failed: {type(e).__name__}: {str(e)[:80]}"
        rows.append(emit(row))
        del model
        gc.collect()
        torch.cuda.empty_cache()
    return rows


def peer_row(shape, lengths, batches):
    """NX-AI's xLSTMLarge, compiled, CUDA graph per decode step (tools/bench_peer.py)."""
    try:
        import torch
        from bench_peer import peer_rows
    except ImportError as e:
        return emit(dict(system="peer", note=f"not installed: {e}"))
    if not torch.cuda.is_available():
        return emit(dict(system="peer", note="no CUDA device for torch"))
    try:
        row = peer_rows(shape, lengths, batches)
    except ImportError as e:  # xlstm / mlstm_kernels missing
        row = dict(system="peer", note=f"not installed: {e}")
    gc.collect()
    torch.cuda.empty_cache()
    return emit(row)


# ---- our side through mlx-lm's own tools --------------------------------------------------

# label -> `mlx_lm benchmark` arguments (issue 14's three axes)
MLX_LM_BENCHMARKS = {
    "prefill 8192": ["-p", "8192", "-g", "64"],
    "decode B=1": ["-p", "512", "-g", "256"],
    "decode B=16": ["-b", "16", "-p", "512", "-g", "128"],
}


def mlx_lm_benchmark(folder, args, trials):
    """`mlx_lm benchmark` in its own process; its 'Averages' line as numbers."""
    import subprocess

    from bench_startup import RUN_CLI

    cmd = [sys.executable, "-c", RUN_CLI, "benchmark", "--model", str(folder), *args, "-n", str(trials)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=tool_env(folder), timeout=900)
    line = next((l for l in proc.stdout.splitlines() if l.startswith("Averages:")), None)
    if proc.returncode or line is None:
        return {"failed": (proc.stdout + proc.stderr)[-600:]}
    return {k: float(v) for k, v in (kv.split("=") for kv in line[len("Averages:"):].replace(" ", "").split(","))}


def build_kernels_s(folder):
    """`python -m mlx_lm_xlstm.warm_up` into the caches the CLI runs share, as a user builds
    them ahead: otherwise a machine's first runs measure the plain path (mlx_lm_xlstm.warm_up)."""
    import subprocess

    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "mlx_lm_xlstm.warm_up", str(folder)], env=tool_env(folder),
                   check=True, timeout=900, capture_output=True)
    return time.perf_counter() - start


def mlx_lm_rows(folder, trials=3):
    row = dict(system="mlx_lm_xlstm through mlx-lm's tools", folder=str(folder), kernel_build_s=build_kernels_s(folder))
    for label, args in MLX_LM_BENCHMARKS.items():
        row[f"mlx_lm benchmark {' '.join(args)}"] = mlx_lm_benchmark(folder, args, trials)
        print(f"  mlx_lm benchmark {' '.join(args)}: {row[f'mlx_lm benchmark {chr(32).join(args)}']}", flush=True)
    row.update(batch_generate_rows(folder))
    return emit(row)


def batch_generate_rows(folder):
    """`batch_generate_in_process` in a process of its own with the caches the CLI runs share:
    it runs the kernels `build_kernels_s` built, as a user's later script would (in this
    process a first load would run the plain path while it builds them itself)."""
    import subprocess

    code = f"import json, sys; sys.path.insert(0, {os.path.dirname(__file__)!r}); import bench; print(json.dumps(bench.batch_generate_in_process({str(folder)!r})))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=tool_env(folder), timeout=900)
    if proc.returncode:
        return {"batch_generate failed": (proc.stdout + proc.stderr)[-600:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def batch_generate_in_process(folder, n=16):
    """mlx-lm's batch_generate on 16 ragged prompts (300-675 tokens), 128 tokens each; the
    second call is the warm one."""
    from mlx_lm import batch_generate, load

    model, tokenizer = load(str(folder))
    tokenizer._eos_token_ids = set()  # as mlx_lm benchmark does: no early stop
    lengths = [300 + (375 * j) // (n - 1) for j in range(n)]
    prompts = [tokens(1, T, 2048, seed=T)[0].tolist() for T in lengths]
    out = {}
    for call in ("first", "warm"):
        start = time.perf_counter()
        stats = batch_generate(model, tokenizer, prompts, max_tokens=128).stats
        out[f"batch_generate 16 ragged {call}"] = dict(
            generation_tps=stats.generation_tps, prompt_tps=stats.prompt_tps, wall_s=time.perf_counter() - start
        )
    del model
    gc.collect()
    return out


def tool_caches(folder):
    """The kernel caches the CLI runs share (beside the folder): the server starts with the
    kernels the benchmark runs compiled, as a user's later runs do."""
    from pathlib import Path

    return Path(folder).parent / "bench-caches"


def tool_env(folder) -> dict:
    """The environment of a tool's own process: the caches the CLI runs share (`tool_caches`)."""
    from bench_startup import ENV, cache_env

    return {**ENV, **cache_env(tool_caches(folder))}


def server_rows(folder):
    """`mlx_lm server` on the folder: 16 concurrent streaming requests of different lengths,
    cold then warm, then 4 one by one (tools/bench_startup.py's server rows)."""
    from pathlib import Path
    from types import SimpleNamespace

    from bench_startup import server_rows as rows

    args = SimpleNamespace(server_requests=16, server_max_tokens=128, prompt_tokens=1550)
    return rows(Path(folder), "xlstm", tool_caches(folder), args)


# ---- our side ------------------------------------------------------------------------------


def our_rows(shape, dtype, lengths, batches, steps, quant_bits, loop_len):
    rows = []
    model = build_model(shape, dtype)
    row = dict(system=f"mlx_lm_xlstm {dtype_name(dtype)}", weights_GiB=weight_bytes(model) / GiB)
    for T in lengths:
        row[f"prefill {T}"], row[f"peak GiB prefill {T}"] = prefill_tok_s(model, T)
        row[f"prefill {T} one pass"], row[f"peak GiB prefill {T} one pass"] = prefill_tok_s(model, T, step=T)
        row[f"prefill {T} ops"] = with_kernels(False, lambda: prefill_tok_s(model, T)[0])
        row[f"GEMM floor {T}"] = gemm_floor_tok_s(model, T)
        row[f"prefill {T} one pass / GEMM floor"] = row[f"prefill {T} one pass"] / row[f"GEMM floor {T}"]
    if lengths:
        row[f"launches/layer, {PREFILL_STEP}-token step"] = launches_per_layer(model, PREFILL_STEP)
        row[f"cell ms, {PREFILL_STEP} tokens, all layers"] = cell_ms(model)
        row[f"cell ms, {PREFILL_STEP} tokens, all layers, no kernel"] = _no_chunk_kernel(lambda: cell_ms(model))
    if loop_len:
        row[f"step-loop {loop_len}"] = step_loop_tok_s(model, loop_len)
        row[f"prefill {loop_len}"] = prefill_tok_s(model, loop_len)[0]
    add_decode(row, model, batches, steps)
    rows.append(emit(row))
    for bits in quant_bits:
        del model
        gc.collect()
        model = build_model(shape, dtype, bits)
        row = dict(system=f"mlx_lm_xlstm {bits}-bit", weights_GiB=weight_bytes(model) / GiB)
        add_decode(row, model, [1], steps, modes=("compiled", "ops"))
        rows.append(emit(row))
    return rows, model


def add_decode(row, model, batches, steps, modes=("compiled", "eager", "ops")):
    for B in batches:
        floor = matvec_floor_tok_s(model, B)
        row[f"floor B={B}"] = floor
        counts = ops_per_layer(model, 1, B)
        row[f"launches/layer, decode step B={B}"], row[f"ops/layer, decode step B={B}"] = counts["launches"], counts["ops"]
        row[f"decode host ms B={B}"] = decode_host_ms(model, B)
        row[f"decode cell us/layer B={B}"], row[f"state pass us/layer B={B}"] = decode_cell_us(model, B)
        for mode in modes:
            label = f"decode B={B} {mode}"
            (tok_s, finite), peak = with_peak(
                lambda: with_kernels(mode != "ops", lambda: decode_tok_s(model, B, steps, mode))
            )
            row[label] = tok_s
            row[f"{label} / floor"] = tok_s / floor
            row[f"peak GiB {label}"] = peak
            assert finite, f"non-finite state in {label}"


def long_prompt_rows(model, lengths):
    """State size and NaN/inf check over long prompts (prefill in 2048-token steps)."""
    row = dict(system="long prompts")
    for T in lengths:
        prompt = tokens(1, T, model.args.vocab_size, seed=T)
        (logits, cache), peak = with_peak(lambda: prefill(model, prompt))
        finite = mx.all(mx.isfinite(logits)).item() and all(
            mx.all(mx.isfinite(a)).item() for c in cache for a in c.cache
        )
        row[f"T={T}"] = dict(peak_GiB=peak, state_MiB=state_bytes(cache) / 2**20, finite=finite)
    return row


def ratios(rows, lengths):
    """Ours against the reference rows of the same run."""
    ours = rows[0]
    row = dict(system="ratios, same run")
    for ref in (r for r in rows if r["system"].startswith("transformers")):
        for T in lengths:
            theirs = ref.get(f"prefill {T}")
            if isinstance(theirs, float):
                for label in (f"prefill {T}", f"prefill {T} one pass"):
                    row[f"{label} / {ref['system']}"] = ours[label] / theirs
        for key, theirs in ref.items():
            if key.startswith("decode B=") and isinstance(theirs, float):
                row[f"{key} compiled / {ref['system']}"] = ours[f"{key} compiled"] / theirs
    peer = next((r for r in rows if r["system"].startswith("peer:")), None)
    if peer:
        for T in lengths:
            if f"prefill {T} compiled" in peer:
                for label in (f"prefill {T}", f"prefill {T} one pass"):
                    row[f"{label} / peer compiled"] = ours[label] / peer[f"prefill {T} compiled"]
        for key, theirs in peer.items():
            if key.startswith("decode B=") and f"{key} compiled" in ours:
                row[f"{key} compiled / peer"] = ours[f"{key} compiled"] / theirs
    if len(row) > 1:
        rows.append(emit(row))


def issue_ratios(rows, server=None):
    """Ours through mlx-lm's tools / the peer, same run (issue 14's `ratios`)."""
    peer = next((r for r in rows if r["system"].startswith("peer:")), None)
    tools = next((r for r in rows if r["system"].startswith("mlx_lm_xlstm through")), None)
    if not (peer and tools):
        return {}
    bench = lambda label: tools[f"mlx_lm benchmark {' '.join(MLX_LM_BENCHMARKS[label])}"]
    out = {
        "prefill_8192_vs_peer": bench("prefill 8192").get("prompt_tps", 0) / peer["prefill 8192 compiled"],
        "decode_b1_vs_peer": bench("decode B=1").get("generation_tps", 0) / peer["decode B=1"],
        "decode_b16_batch_generator_vs_peer": bench("decode B=16").get("generation_tps", 0) / peer["decode B=16"],
        "batch_generate_16_ragged_vs_peer": tools["batch_generate 16 ragged warm"]["generation_tps"] / peer["decode B=16"],
    }
    if server:
        out["server16_vs_peer"] = server["warm"]["aggregate_tok_s"] / peer["decode B=16"]
    return out


def emit(row):
    print(row["system"])
    for k, v in row.items():
        if k != "system":
            print(f"  {k:40s} {v:,.3f}" if isinstance(v, float) else f"  {k:40s} {v}")
    sys.stdout.flush()
    return row


def dtype_name(dtype):
    return str(dtype).split(".")[-1]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=SHAPES, default="tiny")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None)
    p.add_argument("--prefill", default=None, help="prompt lengths, comma-separated")
    p.add_argument("--batches", default="1,4,16")
    p.add_argument("--steps", type=int, default=None, help="decode steps timed")
    p.add_argument("--quant", default=None, help="bits for quantized decode, e.g. 8,4")
    p.add_argument("--long", default="", help="long-prompt lengths for the state/NaN check")
    p.add_argument("--reference", default="", help="reference systems to run too (CUDA): peer,native,triton")
    p.add_argument("--mlx-lm", default=None, help="a model folder to measure through mlx-lm's own tools")
    p.add_argument("--server-json", default=None, help="tools/bench_startup.py's JSON: its xLSTM server rows")
    p.add_argument("--peer-json", default=None, help="tools/bench_peer.py's JSON (the peer run in a call of its own)")
    p.add_argument("--server", action="store_true", help="with --mlx-lm: also mlx_lm server, 16 concurrent streaming requests")
    p.add_argument("--tools-only", action="store_true", help="only the rows through mlx-lm's tools (with --mlx-lm), no harness rows")
    p.add_argument("--json", default=None, help="write all numbers here")
    a = p.parse_args()

    big = a.shape == "7b"
    dtype = getattr(mx, a.dtype or ("bfloat16" if big else "float32"))
    lengths = [int(x) for x in (a.prefill or ("2048,8192" if big else "256,1024")).split(",")]
    batches = [int(x) for x in a.batches.split(",")]
    steps = a.steps or (64 if big else 32)
    quant = [int(x) for x in (a.quant if a.quant is not None else ("8,4" if big else "")).split(",") if x.strip() not in ("", "0")]
    loop_len = 0 if big else 256

    from mlx_lm_xlstm.kernels import step

    info = dict(
        shape=a.shape,
        dtype=dtype_name(dtype),
        machine=platform.machine(),
        device=str(mx.default_device()),
        mlx=mx.__version__,
        fused_step_kernel=step.kernel is not None,
    )
    print(json.dumps(info), flush=True)
    wanted = a.reference.split(",") if a.reference else []
    rows = [peer_row(a.shape, lengths, batches)] if "peer" in wanted else []
    if a.peer_json:
        rows.append(emit(json.load(open(a.peer_json))))
    transformers_backends = [w for w in wanted if w != "peer"]
    rows += reference_rows(a.shape, lengths, batches, steps, transformers_backends) if transformers_backends else []
    def save(rows):  # after each stage, so that a run cut short keeps what it measured
        if a.json:
            with open(a.json, "w") as f:
                json.dump(dict(info=info, rows=rows), f, indent=1, default=str)

    save(rows)
    model = None
    if not a.tools_only:
        ours, model = our_rows(a.shape, dtype, lengths, batches, steps, quant, loop_len)
        rows = ours + rows
        ratios(rows, lengths)
        save(rows)
    if a.long:
        del model
        gc.collect()
        model = build_model(a.shape, dtype)
        rows.append(emit(long_prompt_rows(model, [int(x) for x in a.long.split(",")])))
    if a.mlx_lm:
        del model
        gc.collect()
        model = None
        rows.append(mlx_lm_rows(a.mlx_lm))
        save(rows)
    server = None
    if a.mlx_lm and a.server:
        server = server_rows(a.mlx_lm)
        rows.append(emit(dict(system="mlx_lm server, 16 concurrent streaming requests", **server)))
        save(rows)
    elif a.server_json:
        server = json.load(open(a.server_json))["models"]["xlstm"].get("server")
        rows.append(emit(dict(system="mlx_lm server, 16 concurrent streaming requests (tools/bench_startup.py)", **(server or {}))))
    result = dict(info=info, rows=rows, ratios=issue_ratios(rows, server))
    print(json.dumps(result["ratios"], indent=1))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(result, f, indent=1, default=str)


if __name__ == "__main__":
    main()
