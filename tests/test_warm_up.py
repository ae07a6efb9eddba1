"""A machine's first run: the plain path while a background process builds the fast path's
kernels (mlx_lm_xlstm.warm_up), then the fast path with nothing left to compile."""

import os
import subprocess
import sys
import time
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import pytest

from mlx_lm_xlstm import mlstm, warm_up

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "demo" / "xlstm-stdlib"
GENERATE = ["-m", "mlx_lm", "generate", "--model", str(DEMO), "--ignore-chat-template", "--prompt", "def main(",
            "--max-tokens", "24"]


def cpu_kernels(tmp: Path) -> int:
    """The CPU kernels MLX compiled under this temp folder (it keeps one .so each)."""
    return sum(1 for _ in tmp.rglob("mlx/*/cpu/*.so"))


def generate(env: dict) -> str:
    proc = subprocess.run([sys.executable, *GENERATE], env=env, capture_output=True, text=True, timeout=300, check=True)
    return proc.stdout.split("==========")[1]


@pytest.mark.skipif(mx.metal.is_available(), reason="Metal keeps no kernel on disk: no background build there")
def test_a_first_run_starts_at_once_and_a_later_one_compiles_nothing(tmp_path):
    env = {**os.environ, "TMPDIR": str(tmp_path / "tmp"), "MLX_XLSTM_CACHE_DIR": str(tmp_path / "cache"),
           "MLX_XLSTM_WARM_UP": "1", "HF_HUB_OFFLINE": "1"}
    (tmp_path / "tmp").mkdir()
    first = generate(env)
    # The first run, on the plain path, compiled nothing...
    assert cpu_kernels(tmp_path) == 0
    root = next((tmp_path / "cache").glob("mlx-*/warm-up"))
    deadline = time.monotonic() + 240
    while not list(root.glob("*.done")):
        assert not list(root.glob("*.failed")), next(root.glob("*.failed")).read_text()
        assert time.monotonic() < deadline, (root / next(root.glob("*.log")).name).read_text()
        time.sleep(0.5)
    assert not list(root.glob("*.lock")) and not [p for p in root.iterdir() if p.is_dir()]  # nothing left half-done
    built = cpu_kernels(tmp_path)
    assert built > 10
    # ...the later run, on the fast path, finds every kernel it needs and says the same.
    assert generate(env) == first
    assert cpu_kernels(tmp_path) == built
    # Without the background build, a first run compiles those kernels itself.
    alone = tmp_path / "alone"
    alone.mkdir()
    generate({**env, "TMPDIR": str(alone), "MLX_XLSTM_CACHE_DIR": str(tmp_path / "cache2"), "MLX_XLSTM_WARM_UP": "0"})
    assert cpu_kernels(alone) > 10


@pytest.mark.parametrize("fixture", ["paper_mixed", "paper_slstm", "paper_tied_bias"])
def test_the_paper_stacks_plain_path_compiles_nothing(tmp_path, fixture):
    """A first run's plain path on the paper's stacks (gelu, swish and relu FFNs; sLSTM and
    mLSTM blocks' convolutions and gates): a prompt and decode steps compile no kernel."""
    run = (
        "import sys; sys.path.insert(0, 'tests'); import mlx.core as mx; from conftest import load_fixture; "
        f"m = load_fixture({fixture!r}); c = m.make_cache(); mx.eval(m(mx.array([[1, 2, 3, 4, 5]]), cache=c)); "
        "[mx.eval(m(mx.array([[1]]), cache=c)) for _ in range(3)]"
    )
    env = {**os.environ, "TMPDIR": str(tmp_path), "MLX_XLSTM_KERNELS": "0"}
    subprocess.run([sys.executable, "-c", run], env=env, cwd=ROOT, check=True, timeout=300)
    assert cpu_kernels(tmp_path) == 0


def test_the_copy_has_two_blocks_and_the_models_dtypes_and_quantization():
    from mlx_lm.utils import load_model, quantize_model

    model, config = load_model(DEMO)
    model, _ = quantize_model(model, config, 32, 4)
    spec = warm_up.spec(model)
    copy = warm_up.build(spec)
    assert len(copy.layers) == 2 and copy.args.vocab_size == 64
    assert warm_up.spec(copy)["dtypes"] == spec["dtypes"]
    assert warm_up.spec(copy)["quantized"] == spec["quantized"] != {}
    kinds = {type(m).__name__ for _, m in copy.named_modules()}
    assert "QuantizedLinear" in kinds and "Linear" not in kinds


def test_the_plain_path_runs_while_a_build_is_pending(tmp_path, monkeypatch):
    assert mlstm.fast_path_enabled()
    monkeypatch.setattr(warm_up, "_pending", {"k": tmp_path})
    monkeypatch.setattr(warm_up, "_next_look", 0.0)
    assert not mlstm.fast_path_enabled()
    (tmp_path / "k.failed").write_text("a build that failed: the fast path compiles where it runs")
    monkeypatch.setattr(warm_up, "_next_look", 0.0)
    assert mlstm.fast_path_enabled() and warm_up._pending == {}


@pytest.mark.skipif(not hasattr(os, "getpriority"), reason="no process priorities (not POSIX)")
def test_the_background_build_yields_the_cpu(tmp_path, monkeypatch):
    from conftest import load_fixture

    monkeypatch.setenv("MLX_XLSTM_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("MLX_XLSTM_WARM_UP", "1")
    monkeypatch.setattr(warm_up, "_pending", {})
    started, popen = [], subprocess.Popen

    def stand_in_build(command, **kwargs):  # a process that only waits, in the build's place
        started.append(popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True))
        return started[-1]

    monkeypatch.setattr(warm_up.subprocess, "Popen", stand_in_build)
    warm_up.start(load_fixture("single"))
    try:
        assert len(started) == 1 and warm_up.waiting()
        assert os.getpriority(os.PRIO_PROCESS, started[0].pid) == 19
    finally:
        started[0].kill()
        started[0].wait()


def test_a_failed_build_says_why_and_cleans_up(tmp_path):
    private = tmp_path / "k-private"
    private.mkdir()
    (tmp_path / "k.lock").touch()
    (private / "spec.json").write_text('{"key": "k", "spec": {"config": {"model_type": "xlstm"}}, "moves": []}')
    with pytest.raises(Exception):
        warm_up._background(private / "spec.json")
    assert "Traceback" in (tmp_path / "k.failed").read_text()
    assert not (tmp_path / "k.lock").exists() and not private.exists()


def test_log_sigmoid_is_nn_s():
    x = mx.array([-80.0, -3.0, 0.0, 2.5, 40.0])
    assert mx.array_equal(mlstm.log_sigmoid(x), nn.log_sigmoid(x))


def test_a_paper_stack_copies_too():
    from mlx_lm.utils import load_model

    model, _ = load_model(ROOT / "tests" / "fixtures" / "paper_mixed")
    copy = warm_up.build(warm_up.spec(model))
    assert copy.args.vocab_size == 64 and copy.args.slstm_at == model.args.slstm_at
    assert warm_up.spec(copy)["dtypes"] == warm_up.spec(model)["dtypes"]


def test_the_cli_names_a_folder_it_cannot_build_for(tmp_path):
    (tmp_path / "llama").mkdir()
    (tmp_path / "llama" / "config.json").write_text('{"model_type": "llama"}')
    for folder, says in ((tmp_path / "missing", "no model folder"), (tmp_path / "llama", "expected 'xlstm'")):
        proc = subprocess.run([sys.executable, "-m", "mlx_lm_xlstm.warm_up", str(folder)], capture_output=True, text=True)
        assert proc.returncode == 2 and says in proc.stderr, proc.stderr
