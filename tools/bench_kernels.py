"""The fused kernels' bodies at another commit against this tree's, in one process (CUDA GPU).

    python tools/bench_kernels.py --against 3e9faa9 --json kernels_ab.json
    python tools/bench_kernels.py --against DIR ...   # DIR: that commit's mlx_lm_xlstm/ (no git there)

First whether each kernel (step, gates, gated norm, chunk states) gives the same outputs from
both bodies, each run by its own revision's launch; then decode (batch 1 and 16, pipelined as
mlx-lm's loop, a compiled step per configuration) and prefill of 8,192 tokens through a random
7B with: every kernel from the commit, every kernel from the tree, and the tree with one
kernel from the commit (for each kernel whose body differs). Rounds interleave the
configurations: separate processes of the same code vary more than most kernel changes do,
and a kernel's own launch time says little where the host sets a decode step's pace.
"""

import argparse
import functools
import json
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import mlx.core as mx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

from mlx_lm_xlstm import kernels, mlstm  # noqa: E402
from mlx_lm_xlstm.kernels import chunk_states, cuda, gated_norm, gates, step  # noqa: E402
from mlx_lm_xlstm.kernels.spelling import CUDA  # noqa: E402

MODULES = {"step": step, "gates": gates, "gated_norm": gated_norm, "chunk_states": chunk_states}


def module_at(revision: str, name: str) -> SimpleNamespace:
    """kernels/<name>.py at `revision`, all but the line that builds its kernel, run with its
    relative imports made absolute: its names, body and launch. `revision`: a git revision, or
    a folder holding that revision's mlx_lm_xlstm/ (a machine without the repository's
    history: `git archive REV mlx_lm_xlstm/kernels | tar -x -C DIR`)."""
    if Path(revision).is_dir():
        text = (Path(revision) / "mlx_lm_xlstm" / "kernels" / f"{name}.py").read_text()
    else:
        text = subprocess.run(
            ["git", "-C", str(ROOT), "show", f"{revision}:mlx_lm_xlstm/kernels/{name}.py"],
            capture_output=True, text=True, check=True,
        ).stdout
    text = re.sub(r"^from \.(\w*) import", lambda m: f"from mlx_lm_xlstm.kernels{'.' + m[1] if m[1] else ''} import", text, flags=re.M)
    text = re.sub(r"^BUILT = kernel = .*$", "BUILT = kernel = None", text, flags=re.M)
    namespace = {"__name__": f"{name}_at_{revision}"}
    exec(text, namespace)
    if "LAUNCH_BOUNDS" not in namespace:  # before e61e17d the step spelled its bounds in _build
        found = re.search(r"launch_bounds=(\([^)]*\))", text)
        namespace["LAUNCH_BOUNDS"] = eval(found[1], namespace) if found else None
    return SimpleNamespace(**namespace)


def cuda_kernel(module, tag: str) -> cuda.Kernel:
    """`module`'s kernel (its names, body, launch-time sizes and launch bounds), named apart by
    `tag`: MLX keeps a loaded kernel by its name."""
    bounds = getattr(module, "LAUNCH_BOUNDS", None)
    name = f"{module.NAME}_{re.sub(r'[^A-Za-z0-9]', '_', tag)}"
    return cuda.Kernel(name, module.INPUTS, module.OUTPUTS, module.source(CUDA), runtime=module.RUNTIME, launch_bounds=bounds)


def launcher(name: str, B: int, small: bool):
    """A function of (kernel, its module's launch): one launch of kernel `name` on fixed random inputs."""
    H, Dqk, Dv, K = (2, 16, 40, 72) if small else (8, 256, 512, 4096)
    if name == "step":
        args = kernels._random_step_inputs(B=B, T=1, H=H, Dqk=Dqk, Dv=Dv, dtype=mx.bfloat16)
        return lambda kernel, launch: [launch(kernel, *args, 1e-6)]
    if name == "gates":
        x, w, b = kernels._random_gate_inputs(M=B, G=2 * H, K=K, dtype=mx.bfloat16)
        return lambda kernel, launch: [launch(kernel, x, w, b, 15.0)]
    if name == "gated_norm":
        h, qkvo, w, _, o = kernels._random_norm_inputs(B=B, T=1, H=H, Dv=Dv, dtype=mx.bfloat16, bias=False)
        return lambda kernel, launch: [launch(kernel, h, qkvo, w, None, o, 1e-6)]
    args = kernels._random_chunk_inputs(B=1, H=H, NC=(3 if small else 32) * B, Dqk=Dqk, Dv=Dv, dtype=mx.bfloat16)
    return lambda kernel, launch: [launch(kernel, *args)]


def flat(tree) -> list:
    return [y for x in tree for y in (flat(x) if isinstance(x, (list, tuple)) else [x])]


def same_outputs(sides: dict, small: bool = False) -> dict:
    """Per kernel and batch: whether both sides' (kernel, launch) give the same outputs, bit
    for bit, and their largest difference (a body that sums in another order differs in the
    last bits)."""
    rows = {}
    for name in MODULES:
        for B in (1, 16):
            run = launcher(name, B, small)
            outs = [flat(run(*side[name])) for side in sides.values()]
            mx.eval(outs)
            pairs = list(zip(*outs))
            rows[f"{name} B={B}"] = {
                "same": all(mx.array_equal(a, b).item() for a, b in pairs),
                "max_abs_diff": max(mx.abs(a.astype(mx.float32) - b.astype(mx.float32)).max().item() for a, b in pairs),
            }
    return rows


def configurations(sides: dict, revision: str) -> dict:
    """Every kernel from `revision`, every kernel from the tree, and the tree with one kernel
    from `revision` for each kernel whose body differs."""
    old, tree = sides[revision], sides["tree"]
    found = {revision: old, "tree": tree}
    for name, module in MODULES.items():
        if old[name][0].body != tree[name][0].body:
            found[f"tree, {name} from {revision}"] = {**tree, name: old[name]}
    return found


def model_rows(sides: dict, shape: str, rounds: int, seconds: float) -> dict:
    """Decode and prefill through the model with each configuration's kernels (name -> {kernel
    name: (kernel, launch)}), rounds interleaved."""
    import bench

    from mlx_lm_xlstm.recurrent import CompiledDecode

    # a compiled prefill piece keeps the kernel it was traced with: one compiled function a side
    chunkwise = {side: mx.compile(functools.partial(mlstm.mlstm_chunkwise_ops, states=kernels.chunk_states_kernel)) for side in sides}

    def use(side):  # the kernel and the launch of the same revision: launches change with bodies
        for name, module in MODULES.items():
            module.kernel, module.launch = sides[side][name]
        mlstm._compiled_chunkwise_fused = chunkwise[side]

    model = bench.build_model(shape, mx.bfloat16)
    vocab = model.args.vocab_size
    state, steps = {}, {}

    def decode(side, B, n):
        cache, y = state[B]
        model.decode_step = steps[side]
        y, seconds = bench.pipelined_greedy(model, cache, y, n)
        state[B] = (cache, y)
        return B * n / seconds

    for side in sides:
        use(side)
        steps[side] = CompiledDecode()
        for B in (1, 16):
            if B not in state:
                logits, cache = bench.prefill(model, bench.tokens(B, 8, vocab, seed=B))
                state[B] = (cache, mx.argmax(logits[:, -1], axis=-1)[:, None])
            decode(side, B, 3)
    tok_s, start = {}, time.perf_counter()
    for _ in range(rounds):
        for side in sides:
            use(side)
            for B, n in ((1, 32), (16, 16)):
                tok_s.setdefault(f"decode B={B} {side}", []).append(decode(side, B, n))
        if time.perf_counter() - start > seconds:
            break
    for _ in range(3):
        for side in sides:
            use(side)
            tok_s.setdefault(f"prefill 8192 {side}", []).append(bench.prefill_tok_s(model, 8192, repeat=1)[0])
    use("tree")
    return {key: {"median tok/s": statistics.median(v), "rounds": v} for key, v in tok_s.items()}


def sides_for(revision: str, make=cuda_kernel) -> dict:
    """{revision: ..., "tree": ...}: by kernel name, (kernel, launch) of that revision's module."""
    modules = {revision: {name: module_at(revision, name) for name in MODULES}, "tree": dict(MODULES)}
    return {side: {name: (make(m, side), m.launch) for name, m in found.items()} for side, found in modules.items()}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--against", required=True, help="the commit (or a folder of its mlx_lm_xlstm/) to compare with")
    p.add_argument("--shape", default="7b", help="the model of the decode and prefill rows")
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--seconds", type=float, default=150, help="at most this long for the decode rounds")
    p.add_argument("--json", default=None)
    a = p.parse_args()
    if not mx.cuda.is_available():
        sys.exit("bench_kernels.py times CUDA kernels: it needs MLX's CUDA build and a GPU")
    sides = sides_for(a.against)
    result = {"against": a.against, "first-use checks (tree)": {n: f() for n, f in kernels._CHECKS.items()}}
    result["same outputs"] = same_outputs(sides)
    print(json.dumps(result), flush=True)
    result["model"] = model_rows(configurations(sides, a.against), a.shape, a.rounds, a.seconds)
    print(json.dumps({k: v["median tok/s"] for k, v in result["model"].items()}, indent=1))
    if a.json:
        Path(a.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
