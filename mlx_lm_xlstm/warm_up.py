"""The fast path's kernels built in the background on a machine's first run, not before its
first token.

MLX compiles each fused kernel of an `mx.compile`d function the first time it runs on a
machine (NVRTC on CUDA, the C++ compiler on CPU) and keeps it on disk. The fast path has
about fifteen more of them than a llama: on an H200 each takes ~3.7 s, and a first
`mlx_lm.generate` waited 74 s for its first token. So, while this machine (this MLX, this
package, this model's constants and dtypes) has not built them, models run the plain path
(`mlstm.fast_path_enabled` says no: eager MLX ops, whose kernels ship compiled) and a
background process builds them. It runs a two-block copy of the model (same constants, head
shapes, dtypes and quantization: MLX names a fused kernel by its ops, dtypes and constants,
not by its sizes) through the calls mlx-lm makes: prompts of several lengths, decode,
prompt-cache turns, batches, speculative rounds. It writes to private caches, whose files
then move into the user's one by one (`os.replace`: no process reads a half-written kernel),
and leaves a marker; the next model call takes the fast path, loading the kernels from disk.
A kernel it missed is compiled where it is first needed, as before.

Metal keeps no kernel on disk: there (and with MLX_XLSTM_WARM_UP=0, which builds them in
the process that needs them) the fast path runs from the first call.

    python -m mlx_lm_xlstm.warm_up MODEL_FOLDER    # build ahead, in the foreground
"""

import argparse
import functools
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_map_with_path

from .kernels.cuda import cache_dir, device_signature

# A lock older than this is a build that died without cleaning up.
STALE_LOCK_S = 900
# How often a waiting process looks for the marker.
POLL_S = 0.5

_pending = {}  # key -> the marker a model of this process waits for
_next_look = 0.0


def enabled() -> bool:
    """Whether first runs build in the background: off on Metal (no kernel cache on disk) and
    with MLX_XLSTM_WARM_UP=0."""
    return os.environ.get("MLX_XLSTM_WARM_UP", "1").strip() != "0" and not mx.metal.is_available()


def waiting() -> bool:
    """True while a model of this process waits for its background build (the plain path runs)."""
    global _next_look
    if not _pending or time.monotonic() < _next_look:
        return bool(_pending)
    _next_look = time.monotonic() + POLL_S
    for key, root in list(_pending.items()):
        if _done(root, key):
            del _pending[key]
    return bool(_pending)


def _pattern(path: str) -> str:
    """A parameter's path with block indices wildcarded: one dtype for every layer's copy."""
    return re.sub(r"\.\d+(?=\.|$)", ".*", path)


def spec(model) -> dict:
    """What the background build needs to make the same kernels as `model`."""
    dtypes = {_pattern(p): str(v.dtype).split(".")[-1] for p, v in tree_flatten(model.parameters())}
    quantized = {
        _pattern(p): {"group_size": m.group_size, "bits": m.bits, "mode": m.mode}
        for p, m in model.named_modules()
        if hasattr(m, "bits") and hasattr(m, "group_size")
    }
    return {"config": model.warm_up_config(), "dtypes": dtypes, "quantized": quantized}


@functools.lru_cache(maxsize=None)
def _sources_digest() -> str:
    """This package's sources, read once a process (the CLI and `start` both key a model)."""
    package = Path(__file__).resolve().parent
    h = hashlib.sha256()
    for path in sorted(package.rglob("*.py")):
        h.update(path.relative_to(package).as_posix().encode() + path.read_bytes())
    return h.hexdigest()


def _key(model_spec: dict) -> str:
    text = json.dumps([mx.__version__, str(mx.default_device()), device_signature(), _sources_digest(), model_spec], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def _root() -> Path:
    return cache_dir() / "warm-up"


def _done(root: Path, key: str) -> bool:
    """Built, or the build failed (the fast path then compiles in the process, as without it)."""
    return (root / f"{key}.done").exists() or (root / f"{key}.failed").exists()


def _user_caches() -> list:
    """(variable, folder) of MLX's kernel caches in this process: its temp folder (CPU
    kernels; CUDA ones too unless MLX_PTX_CACHE_DIR is set)."""
    caches = [("TMPDIR", tempfile.gettempdir())]
    if os.environ.get("MLX_PTX_CACHE_DIR"):
        caches.append(("MLX_PTX_CACHE_DIR", os.environ["MLX_PTX_CACHE_DIR"]))
    return caches


def _take_lock(lock: Path) -> bool:
    try:
        fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        try:
            if time.time() - lock.stat().st_mtime < STALE_LOCK_S:
                return False
            lock.unlink()
        except OSError:
            return False
        return _take_lock(lock)
    os.close(fd)
    return True


def start(model, wait: bool = False):
    """Start the background build for `model` unless this machine has it; from then on, until
    it is done, `waiting()` says so. With `wait`, build in the foreground (or wait for the
    process that is building it)."""
    if not enabled() and not wait:
        return
    model_spec = spec(model)
    key, root = _key(model_spec), _root()
    if _done(root, key):
        return
    try:
        root.mkdir(parents=True, exist_ok=True)
        if not _take_lock(root / f"{key}.lock"):  # another process is building it
            if wait:
                _wait_for(root, key)
            else:
                _pending[key] = root
            return
        private = Path(tempfile.mkdtemp(prefix=f"{key}-", dir=root))
    except OSError:  # a read-only cache folder: build where needed, as without this
        return
    moves = []
    env = dict(os.environ, MLX_XLSTM_WARM_UP="0", PYTHONWARNINGS="ignore")
    for j, (variable, folder) in enumerate(_user_caches()):
        (private / str(j)).mkdir()
        env[variable] = str(private / str(j))
        moves.append([str(private / str(j)), folder])
    (private / "spec.json").write_text(json.dumps({"key": key, "spec": model_spec, "moves": moves}))
    with open(root / f"{key}.log", "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "mlx_lm_xlstm.warm_up", "--spec", str(private / "spec.json")],
            env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
    if wait:
        proc.wait()
    else:
        _yield_cpu(proc.pid)
        _pending[key] = root


def _yield_cpu(pid: int):
    """The background build at the lowest CPU priority (its compilers inherit it): where the
    CPU is busy, the user's run comes first (a first run of the demo on an idle 2-core CPU
    showed no difference). Set right after the process starts, before it starts threads of
    its own (which inherit a thread's priority)."""
    try:
        os.setpriority(os.PRIO_PROCESS, pid, 19)
    except (AttributeError, OSError):  # not POSIX, or the process is gone already
        pass


def _wait_for(root: Path, key: str):
    while not _done(root, key) and (root / f"{key}.lock").exists():
        time.sleep(POLL_S)


def exercise(model):
    """The calls mlx-lm makes, each kind at a few lengths: every fused kernel they compile."""
    from mlx_lm.generate import BatchGenerator, generate_step, speculative_generate_step
    from mlx_lm.models.cache import make_prompt_cache

    def ids(n, seed):
        return mx.random.randint(1, 64, (n,), key=mx.random.key(seed))

    for n in (1, 3, 10, 20, 40, 70, 100, 300, 1550, 4200):  # 4200: mlx-lm's 2048-token prefill steps
        # Tokenizers that add BOS (id 0) make a first call whose inserted BOS step is masked.
        for prompt in (ids(n, n), mx.concatenate([mx.zeros((1,), mx.int32), ids(n, n)])):
            for _ in generate_step(prompt, model, max_tokens=2):
                pass
        cache = make_prompt_cache(model)
        for _ in generate_step(ids(n, n), model, max_tokens=3, prompt_cache=cache):
            pass
        for _ in generate_step(ids(n + 5, 2 * n), model, max_tokens=2, prompt_cache=cache):  # a later chat turn
            pass
    for _ in speculative_generate_step(ids(30, 1), model, model, num_draft_tokens=3, max_tokens=8):
        pass
    for lengths in ((7, 30, 100), (20, 20)):
        generator = BatchGenerator(model, max_tokens=4)
        generator.insert([ids(n, n).tolist() for n in lengths], max_tokens=[2 + j for j in range(len(lengths))])
        while generator.next_generated():
            pass
        generator.close()


def build(model_spec: dict):
    """The small copy of the model `spec` describes, with its dtypes and quantization."""
    from . import xlstm

    model = xlstm.Model(xlstm.ModelArgs.from_dict(dict(model_spec["config"])))
    quantized = model_spec["quantized"]
    if quantized:
        nn.quantize(model, class_predicate=lambda path, m: quantized.get(_pattern(path), False))
    dtypes = model_spec["dtypes"]
    model.update(tree_map_with_path(lambda p, v: v.astype(getattr(mx, dtypes.get(_pattern(p), str(v.dtype).split(".")[-1]))), model.parameters()))
    mx.eval(model.parameters())
    return model


def _move(source: Path, target: Path):
    """Every file of `source` into `target` (same relative path) that target lacks; the file
    MLX looks for first (.ptx, .so) last, each by one rename."""
    files = [p for p in source.rglob("*") if p.is_file()]
    for path in sorted(files, key=lambda p: p.suffix in (".ptx", ".so")):
        dest = target / path.relative_to(source)
        if dest.exists():
            continue
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
        shutil.copyfile(path, tmp)
        os.replace(tmp, dest)


def _background(spec_path: Path):
    job = json.loads(spec_path.read_text())
    key, root, private = job["key"], spec_path.parent.parent, spec_path.parent
    try:
        exercise(build(job["spec"]))
        mx.synchronize()
        for source, target in job["moves"]:
            _move(Path(source), Path(target))
        (root / f"{key}.done").touch()
    except Exception:
        (root / f"{key}.failed").write_text(traceback.format_exc())
        raise
    finally:
        (root / f"{key}.lock").unlink(missing_ok=True)
        shutil.rmtree(private, ignore_errors=True)


def main():
    parser = argparse.ArgumentParser(prog="python -m mlx_lm_xlstm.warm_up", description="Build the fast path's kernels for an xLSTM model on this machine.")
    parser.add_argument("model", nargs="?", help="a model folder (or Hugging Face repo) mlx-lm loads")
    parser.add_argument("--spec", type=Path, help=argparse.SUPPRESS)  # the background build's job
    args = parser.parse_args()
    if args.spec:
        return _background(args.spec)
    if not args.model:
        parser.error("give a model folder")
    folder = Path(args.model).expanduser()
    if folder.exists() or args.model.startswith(("/", ".", "~")):  # a path, not a Hugging Face repo
        from .info import read_config

        try:
            read_config(folder)  # names a missing folder or config, or a model that is not an xLSTM
        except (OSError, ValueError) as e:
            parser.error(str(e))
    from mlx_lm import load

    model, _ = load(args.model, lazy=True)  # the spec needs the dtypes, not the weights
    key, started = _key(spec(model)), time.perf_counter()
    if _done(_root(), key):
        print(f"kernels already built for this machine ({_root() / key}.done)")
    else:
        start(model, wait=True)
        print(f"kernels built for this machine in {time.perf_counter() - started:.1f} s ({_root() / key}.done)")
    if (_root() / f"{key}.failed").exists():
        sys.exit(f"the build failed; see {_root() / key}.failed")


if __name__ == "__main__":
    main()
