"""The PyTorch peer an NVIDIA user would pick instead: NX-AI's own xLSTMLarge (xlstm 2.0.6,
the model class the xLSTM 7B paper benchmarks) with the paper's recipe for speed.

    python tools/bench_peer.py --shape 7b --json peer.json    # CUDA, xlstm + mlstm_kernels installed

Random bf16 weights, fp32 state, fused weights, inference mode, mlstm_kernels' Triton kernels
(chunkwise `triton_limit_chunk`: TFLA's `triton_xl_chunk` hits an LLVM assertion in Triton
3.6), torch.compile for prefill, and decode captured as one CUDA graph per step (static token
and state; xLSTMLarge updates its state in place, so replaying the graph advances it).
Rows: prefill tok/s at each length (eager and compiled, batch 1), decode tok/s at each batch
size (batch x steps / time), peak GiB.
"""

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from random_models import SHAPES  # noqa: E402


def seconds(fn, n, sync):
    fn()
    sync()
    start = time.perf_counter()
    for _ in range(n):
        fn()
    sync()
    return (time.perf_counter() - start) / n


def peer_rows(shape: str, lengths, batches, steps: int = 50) -> dict:
    import torch
    from xlstm.xlstm_large.model import xLSTMLarge, xLSTMLargeConfig

    s = SHAPES[shape]
    cfg = xLSTMLargeConfig(
        embedding_dim=s["hidden_size"], num_heads=s["num_heads"], num_blocks=s["num_hidden_layers"],
        vocab_size=s["vocab_size"], mode="inference", return_last_states=True, weight_mode="fused",
        chunkwise_kernel="chunkwise--triton_limit_chunk", sequence_kernel="native_sequence__triton",
        step_kernel="triton", inference_state_dtype="float32", autocast_kernel_dtype="bfloat16",
    )
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = xLSTMLarge(cfg).to(torch.bfloat16).eval()
    compiled = torch.compile(model, dynamic=False)
    sync = torch.cuda.synchronize
    row = {"system": "peer: NX-AI xLSTMLarge, Triton kernels, torch.compile, CUDA graph per decode step",
           "gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
           "params": sum(p.numel() for p in model.parameters())}
    with torch.no_grad():
        for T in lengths:
            x = torch.randint(1, s["vocab_size"], (1, T), device="cuda")
            for name, fwd in (("eager", model), ("compiled", compiled)):
                start = time.perf_counter()
                fwd(x)  # compile / autotune outside the timing
                sync()
                row[f"prefill {T} {name} first call s"] = time.perf_counter() - start
                row[f"prefill {T} {name}"] = T / seconds(lambda: fwd(x), 3, sync)
        for B in batches:
            _, state = model(torch.randint(1, 1000, (B, 64), device="cuda"))
            tok = torch.randint(1, 1000, (B, 1), device="cuda")
            for _ in range(3):
                compiled(tok, state)
            sync()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                compiled(tok, state)
            row[f"decode B={B}"] = B / seconds(graph.replay, steps, sync)
    row["peak GiB"] = torch.cuda.max_memory_allocated() / 2**30
    return row


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=SHAPES, default="7b")
    p.add_argument("--prefill", default="2048,8192")
    p.add_argument("--batches", default="1,16")
    p.add_argument("--json", default=None)
    a = p.parse_args()
    row = peer_rows(a.shape, [int(x) for x in a.prefill.split(",")], [int(x) for x in a.batches.split(",")])
    for k, v in row.items():
        print(f"  {k:40s} {v:,.3f}" if isinstance(v, float) else f"  {k:40s} {v}", flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps(row, indent=1))


if __name__ == "__main__":
    main()
