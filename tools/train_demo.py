"""Train the embedded demo model: the xLSTM-7b architecture at small scale, on the Python
standard library's own source (text every Python install ships), with a byte-level BPE
tokenizer trained on the same text. The result is an ordinary mlx-lm model folder.

    python tools/train_demo.py --out demo/xlstm-stdlib                  # prepare + train
    python tools/train_demo.py prepare --work .demo_build               # tokenizer + token ids
    python tools/train_demo.py train --work .demo_build --out DIR --max-seconds 240

`prepare` and `train` are split so the data can be made once (here) and the training run
elsewhere (the GPU machine) on exactly the same tokens. `--backend mlx` trains our Model, under
mx.compile unless `--no-compile` (the committed demo trained eagerly: on CUDA the compiled step
took minutes to JIT); `--backend torch` trains transformers' xLSTM (same weights, same names) for
CPU-only machines, where MLX's Linux BLAS is ~25x slower than PyTorch's. Either way the held-out
loss is measured with our MLX model, so the number in training.json is what mlx-lm users get.
demo/README.md records how the committed demo was made.
"""

import argparse
import json
import math
import sys
import sysconfig
import time
from functools import partial
from pathlib import Path

import numpy as np

VOCAB = 4096
CONFIG = dict(
    model_type="xlstm",
    architectures=["xLSTMForCausalLM"],
    vocab_size=VOCAB,
    hidden_size=256,
    embedding_dim=256,
    num_hidden_layers=6,
    num_blocks=6,
    num_heads=4,
    qk_dim_factor=0.5,
    v_dim_factor=1.0,
    chunk_size=64,
    gate_soft_cap=15.0,
    output_logit_soft_cap=30.0,
    ffn_proj_factor=2.667,
    ffn_round_up_to_multiple_of=64,
    mlstm_round_up_to_multiple_of=64,
    norm_eps=1e-6,
    eps=1e-6,
    use_bias=False,
    add_out_norm=True,
    weight_mode="single",
    tie_word_embeddings=False,
    bos_token_id=0,
    eos_token_id=0,
    pad_token_id=1,
    force_bos_token_insert=True,
    inference_state_dtype="float32",
    torch_dtype="bfloat16",
)
SEQ_LEN = 255  # +1 for the BOS the model inserts = 256, a whole number of chunks
HOLDOUT_EVERY = 50  # every 50th file is held out for validation


def stdlib_files(lib: Path = None) -> list:
    """The standard library's Python source in a fixed order; tests, bundled packages and the
    data tables (codec maps, pydoc's topic text) left out so the model learns code."""
    lib = Path(lib or sysconfig.get_paths()["stdlib"])
    skip = {"test", "tests", "idlelib", "site-packages", "dist-packages", "lib2to3", "__pycache__",
            "encodings", "pydoc_data"}
    files = [p for p in sorted(lib.rglob("*.py")) if not skip.intersection(p.relative_to(lib).parts)]
    if not files:
        raise FileNotFoundError(f"no Python source found under {lib}")
    return files


def read_texts(files) -> list:
    return [p.read_text(encoding="utf-8", errors="replace") for p in files]


def prepare(work: Path, vocab_size: int = VOCAB, lib: Path = None, max_files: int = None):
    """Tokenizer files under work/tokenizer, token streams (files joined by <|endoftext|>)
    in work/train.npy and work/valid.npy."""
    files = stdlib_files(lib)[:max_files]
    texts = read_texts(files)
    from mlx_lm_xlstm.save import byte_level_tokenizer

    work.mkdir(parents=True, exist_ok=True)
    tokenizer = byte_level_tokenizer(vocab_size, texts)
    tokenizer.save_pretrained(work / "tokenizer")
    tok = tokenizer.backend_tokenizer
    streams = {"train": [], "valid": []}
    holdout = min(HOLDOUT_EVERY, len(texts))
    for n, enc in enumerate(tok.encode_batch(texts)):
        streams["valid" if n % holdout == holdout - 1 else "train"] += enc.ids + [0]
    for split, ids in streams.items():
        np.save(work / f"{split}.npy", np.array(ids, dtype=np.uint16))
    info = dict(
        python=sys.version.split()[0], files=len(files), bytes=sum(len(t.encode()) for t in texts),
        train_tokens=len(streams["train"]), valid_tokens=len(streams["valid"]), vocab_size=vocab_size,
    )
    (work / "data.json").write_text(json.dumps(info, indent=2))
    print(f"prepared: {info}", flush=True)
    return info


def init_weights(model, args):
    """NX-AI's initialisation for xLSTM-large (as transformers' _init_weights): small-init
    projections, Wang-init output projections, gates off at the start (input gate bias -10,
    forget gate bias 3..6, gate weights 0)."""
    import mlx.core as mx
    from mlx.utils import tree_flatten, tree_unflatten

    D, L, H = args.hidden_size, args.num_hidden_layers, args.num_heads
    small, wang = math.sqrt(2 / (5 * D)), 2 / L / math.sqrt(D)
    new = []
    for name, p in tree_flatten(model.parameters()):
        if "gate_preact.weight" in name and "ogate" not in name:
            value = mx.zeros(p.shape)
        elif "if_gate_preact.bias" in name:  # input gates, then forget gates
            value = mx.concatenate([mx.full((H,), -10.0), mx.linspace(3.0, 6.0, H)])
        elif name.endswith(("proj_down.weight", "out_proj.weight")):
            value = wang * mx.random.normal(p.shape)
        elif name.endswith("norm.weight") or "norm_" in name or name.endswith(".bias"):
            value = p
        else:
            value = small * mx.random.normal(p.shape)
        new.append((name, value))
    model.update(tree_unflatten(new))


def batches(ids: np.ndarray, batch_size: int, seq_len: int, rng):
    """Random windows of the token stream: inputs and next-token targets."""
    while True:
        starts = rng.integers(0, len(ids) - seq_len - 1, size=batch_size)
        window = np.stack([ids[s : s + seq_len + 1] for s in starts]).astype(np.int32)
        yield window[:, :-1], window[:, 1:]


def model_config(vocab_size: int, hidden_size: int, num_blocks: int) -> dict:
    return {**CONFIG, "vocab_size": vocab_size, "hidden_size": hidden_size, "embedding_dim": hidden_size,
            "num_hidden_layers": num_blocks, "num_blocks": num_blocks}


class Schedule:
    """MLX's linear warm-up (3%) then cosine decay to 0.1 x peak, read at a progress that is
    the larger of steps done / steps and time spent / max_seconds (in 1/TICKS of the run)."""

    TICKS = 10_000

    def __init__(self, steps: int, max_seconds: float, lr: float, warmup: float = 0.03, floor: float = 0.1):
        import mlx.optimizers as optim

        self.steps, self.max_seconds = steps, max_seconds
        warm = round(warmup * self.TICKS)
        self.lr_at = optim.join_schedules(
            [optim.linear_schedule(0.0, lr, warm), optim.cosine_decay(lr, self.TICKS - warm, floor * lr)], [warm]
        )
        self.start, self.n = time.perf_counter(), 0

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def next_lr(self):
        """Learning rate of the next step, or None when training is over."""
        progress = max(self.n / self.steps, self.elapsed / self.max_seconds)
        self.n += 1
        return None if progress >= 1 else self.lr_at(progress * self.TICKS).item()


def train_mlx(config, data, schedule, log, compile_step=True):
    """Our Model, AdamW, value_and_grad (under mx.compile if compile_step). Returns the weights."""
    import mlx.core as mx
    import mlx.nn as nn
    import mlx.optimizers as optim

    from mlx_lm_xlstm.xlstm import Model, ModelArgs

    args = ModelArgs.from_dict(dict(config))
    model = Model(args)
    init_weights(model, args)
    mx.eval(model.parameters())

    def loss_fn(model, x, y):
        return nn.losses.cross_entropy(model(x), y, reduction="mean")

    optimizer = optim.AdamW(learning_rate=0.0, betas=(0.9, 0.95), weight_decay=0.1)
    state = [model.state, optimizer.state]

    def step(x, y):
        loss, grads = nn.value_and_grad(model, loss_fn)(model, x, y)
        grads, _ = optim.clip_grad_norm(grads, 1.0)
        optimizer.update(model, grads)
        return loss

    if compile_step:
        step = partial(mx.compile, inputs=state, outputs=state)(step)
    print(f"mlx on {mx.default_device()}, params {sum(p.size for _, p in _flat(model)):,}", flush=True)
    while (lr := schedule.next_lr()) is not None:
        optimizer.learning_rate = mx.array(lr)
        x, y = next(data)
        loss = step(mx.array(x), mx.array(y))
        mx.eval(loss, state)
        log(loss.item())
    return dict(_flat(model))


def train_torch(config, data, schedule, log):
    """The same architecture in transformers (the reference our loader is tested against),
    for CPUs where MLX's Linux BLAS is slow. Returns the weights as MLX arrays."""
    import mlx.core as mx
    import torch
    from transformers import xLSTMConfig, xLSTMForCausalLM

    torch.manual_seed(0)
    keys = ("vocab_size", "hidden_size", "num_hidden_layers", "num_heads", "qk_dim_factor", "v_dim_factor",
            "chunk_size", "gate_soft_cap", "output_logit_soft_cap", "ffn_proj_factor",
            "ffn_round_up_to_multiple_of", "norm_eps", "eps", "use_bias", "weight_mode", "tie_word_embeddings")
    model = xLSTMForCausalLM(xLSTMConfig(**{k: config[k] for k in keys}, use_cache=False, max_inference_chunksize=1 << 20))
    decay = [p for n, p in model.named_parameters() if p.ndim == 2 and "gate_preact" not in n]
    rest = [p for n, p in model.named_parameters() if not (p.ndim == 2 and "gate_preact" not in n)]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}],
                                  lr=0.0, betas=(0.9, 0.95))
    print(f"torch on cpu ({torch.get_num_threads()} threads), params {sum(p.numel() for p in model.parameters()):,}", flush=True)
    bos = torch.full((1, 1), config["bos_token_id"])
    while (lr := schedule.next_lr()) is not None:
        for group in optimizer.param_groups:
            group["lr"] = lr
        x, y = (torch.from_numpy(a).long() for a in next(data))
        # The MLX model runs BOS first (force_bos_token_insert): train on the same inputs.
        logits = model(torch.cat([bos.expand(len(x), 1), x], dim=1)).logits[:, 1:]
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        log(loss.item())
    return {k: mx.array(v.float().numpy()) for k, v in model.state_dict().items()}


def train(work: Path, out: Path, steps: int, max_seconds: float, batch_size: int, lr: float,
          hidden_size: int = 256, num_blocks: int = 6, backend: str = "mlx", compile_step: bool = True,
          eval_windows: int = 64, seed: int = 0, log_every: int = 50):
    """Train until `steps` or `max_seconds`, then evaluate the held-out files with our MLX
    model (whatever trained it) and write an mlx-lm folder to `out`."""
    import mlx.core as mx

    mx.random.seed(seed)
    train_ids, valid_ids = (np.load(work / f"{s}.npy") for s in ("train", "valid"))
    config = model_config(json.loads((work / "data.json").read_text())["vocab_size"], hidden_size, num_blocks)
    data = batches(train_ids, batch_size, SEQ_LEN, np.random.default_rng(seed))
    schedule, losses, log = Schedule(steps, max_seconds, lr), [], []

    def record_loss(loss):
        losses.append(loss)
        if len(losses) % log_every == 0:
            row = dict(step=len(losses), loss=round(float(np.mean(losses[-log_every:])), 4), seconds=round(schedule.elapsed, 1))
            log.append(row)
            print(row, flush=True)

    print(f"train tokens {len(train_ids):,}, backend {backend}", flush=True)
    if backend == "mlx":
        weights = train_mlx(config, data, schedule, record_loss, compile_step)
    else:
        weights = train_torch(config, data, schedule, record_loss)
    seconds = schedule.elapsed
    model = load_weights(config, weights)
    valid_loss = evaluate(model, valid_ids, batch_size, eval_windows)
    record = dict(
        backend=backend, steps=len(losses), seconds=round(seconds, 1), tokens=len(losses) * batch_size * SEQ_LEN,
        batch_size=batch_size, seq_len=SEQ_LEN, peak_lr=lr,
        final_train_loss=round(float(np.mean(losses[-log_every:])), 4) if losses else None,
        valid_loss=round(valid_loss, 4), valid_ppl=round(math.exp(valid_loss), 2), valid_windows=eval_windows,
        device=str(mx.default_device()) if backend == "mlx" else "cpu (torch)", log=log,
    )
    print({k: v for k, v in record.items() if k != "log"}, flush=True)
    save(model, config, work / "tokenizer", out, record)
    return record


def load_weights(config: dict, weights: dict):
    """Our MLX model holding `weights` (bf16, as saved), through the model's own sanitize."""
    import mlx.core as mx

    from mlx_lm_xlstm.xlstm import Model, ModelArgs

    model = Model(ModelArgs.from_dict(dict(config)))
    weights = model.sanitize({k: v.astype(mx.bfloat16) for k, v in weights.items()})
    model.load_weights(list(weights.items()))
    mx.eval(model.parameters())
    return model


def _flat(model):
    from mlx.utils import tree_flatten

    return tree_flatten(model.parameters())


def evaluate(model, ids: np.ndarray, batch_size: int, windows: int = 64) -> float:
    """Mean next-token loss over consecutive held-out windows (mlx-lm's eval_ppl)."""
    import mlx.core as mx
    from mlx_lm.perplexity import eval_ppl

    n = min(windows, (len(ids) - 1) // (SEQ_LEN + 1))
    if n < 1:
        raise ValueError(f"held-out stream of {len(ids)} tokens is shorter than one window ({SEQ_LEN + 1})")
    ppl, _ = eval_ppl(model, mx.array(ids[: n * (SEQ_LEN + 1)].reshape(n, SEQ_LEN + 1).astype(np.int32)), batch_size)
    return math.log(ppl)


def save(model, config: dict, tokenizer: Path, out: Path, record: dict):
    """An mlx-lm folder (bf16 weights under our names, config, the tokenizer from `tokenizer`)
    with the training record, built beside `out` and moved into place when complete."""
    from transformers import PreTrainedTokenizerFast

    from mlx_lm_xlstm.save import save_checkpoint

    save_checkpoint(out, model, config, tokenizer=PreTrainedTokenizerFast.from_pretrained(tokenizer),
                    files={"training.json": json.dumps(record, indent=2) + "\n"}, overwrite=True)
    print(f"saved {out}", flush=True)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stage", nargs="?", choices=["prepare", "train", "all"], default="all")
    parser.add_argument("--work", type=Path, default=Path(".demo_build"), help="tokenizer and token ids")
    parser.add_argument("--out", type=Path, default=Path("demo/xlstm-stdlib"))
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--max-seconds", type=float, default=900.0)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--vocab-size", type=int, default=VOCAB)
    parser.add_argument("--hidden-size", type=int, default=256)
    parser.add_argument("--num-blocks", type=int, default=6)
    parser.add_argument("--backend", choices=["mlx", "torch"], default="mlx",
                        help="torch: transformers' xLSTM, for CPUs where MLX's Linux BLAS is slow")
    parser.add_argument("--no-compile", dest="compile_step", action="store_false", help="mlx: skip mx.compile")
    parser.add_argument("--eval-windows", type=int, default=64)
    parser.add_argument("--log-every", type=int, default=50)
    parser.add_argument("--max-files", type=int, default=None, help="fewer stdlib files (a quick check)")
    a = parser.parse_args(argv)
    if a.stage in ("prepare", "all"):
        prepare(a.work, a.vocab_size, max_files=a.max_files)
    if a.stage in ("train", "all"):
        train(a.work, a.out, a.steps, a.max_seconds, a.batch_size, a.lr, a.hidden_size, a.num_blocks,
              a.backend, a.compile_step, a.eval_windows, log_every=a.log_every)


if __name__ == "__main__":
    main()
