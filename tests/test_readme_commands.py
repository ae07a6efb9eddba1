"""Every shell command README.md shows is run as written, or named here with the reason it
cannot run on this machine and run in its nearest local stand-in.

The README shows commands in indented blocks (4 spaces, or 6 inside a list item), Python in
```python fences, and mentions `pip install ...` / `python ...` commands inline; bare ``` fences
hold the layout tree only (checked). Commands run in README order in one scratch folder (later
ones use what earlier ones wrote: `xlstm-7b-4bit`, `tiny_xlstm`, `~/models/...`), with the
repository's folders linked into it, this environment's bin/ first on PATH, HOME in the scratch
folder and the Hub offline. Servers are started as written but on a free port, answer one
completion and are stopped; `chat` gets one turn and `q` on stdin. Run the module whole: a
command may need an earlier one's output.
"""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
LINKED = ["demo", "tools", "examples", "upload_scripts", "pyproject.toml", "mlx_lm_xlstm", "mlx_lm_xlstm.pth",
          "README.md"]
COMMAND = re.compile(r"^(pip install|python3?) ")  # inline spans that are commands (`python -m X` alone is a name)
DEMO_PY = ROOT / "demo" / "xlstm-stdlib"

# README command -> (why it cannot run here, the stand-in run instead or None).
NOT_HERE = {
    # Install and run
    'python3 -m venv .venv && . .venv/bin/activate && pip install -e ".[cpu,test]" && pip install --no-deps '
    'xlstm==2.0.6 mlstm_kernels==2.0.6 && mlx_lm.generate --model demo/xlstm-stdlib --ignore-chat-template '
    '--prompt "def main(" --max-tokens 60': (
        "CI's install (.ci/run runs it word for word); this environment is that install",
        'mlx_lm.generate --model demo/xlstm-stdlib --ignore-chat-template --prompt "def main(" --max-tokens 60'),
    ". .venv/bin/activate && python -m pytest -q": (
        "the test suite this test is part of",
        f"python -m pytest -q --collect-only -p no:cacheprovider {ROOT / 'tests'}"),
    "python3 -m venv .venv && . .venv/bin/activate && pip install torch==2.13.0 --index-url "
    "https://download.pytorch.org/whl/cpu": (
        "download.pytorch.org is not reachable here",
        "python -c \"import torch; assert torch.__version__.split('+')[0] == '2.13.0' and not torch.cuda.is_available()\""),
    'pip install -e ".[cpu]"       # Linux CPU': (
        "would reinstall the package into the environment the tests run in",
        'pip install --dry-run --no-deps --no-build-isolation --no-index ".[cpu]"'),
    "pip install -e .              # macOS": (
        "macOS, and would reinstall the package here", "pip install --dry-run --no-deps --no-build-isolation --no-index ."),
    'pip install -e ".[cuda13]"    # NVIDIA': (
        "NVIDIA, and would reinstall the package here",
        'pip install --dry-run --no-deps --no-build-isolation --no-index ".[cuda13]"'),
    'pip install "mlx-lm-xlstm[cpu]"': ("not on the package index yet", None),
    "pip install mlx-lm-xlstm": ("not on the package index yet", None),
    'pip install "mlx-lm-xlstm[cuda13]"': ("not on the package index yet", None),
    "pip install datasets": ("mlx-lm's optional dependency, from the package index", None),
    # xLSTM-7b: a 28 GB download; the demo model stands in
    'mlx_lm.generate --model NX-AI/xLSTM-7b --ignore-chat-template --prompt "The capital of France is" --max-tokens 50': (
        "downloads NX-AI/xLSTM-7b (28 GB)",
        'mlx_lm.generate --model demo/xlstm-stdlib --ignore-chat-template --prompt "The capital of France is" --max-tokens 50'),
    "mlx_lm.convert --hf-path NX-AI/xLSTM-7b --mlx-path xlstm-7b-4bit -q --q-bits 4": (
        "downloads NX-AI/xLSTM-7b (28 GB)", "mlx_lm.convert --hf-path demo/xlstm-stdlib --mlx-path xlstm-7b-4bit -q --q-bits 4"),
    "PYTHON": ("downloads NX-AI/xLSTM-7b (28 GB)", "the same code on demo/xlstm-stdlib"),
    # Distributed
    "mlx_lm.convert --hf-path NX-AI/xLSTM-7b --mlx-path ~/models/xlstm-7b-bf16 --dtype bfloat16": (
        "downloads NX-AI/xLSTM-7b (28 GB)",
        "mlx_lm.convert --hf-path demo/xlstm-stdlib --mlx-path ~/models/xlstm-7b-bf16 --dtype bfloat16"),
    "mlx.distributed_config --over thunderbolt --backend ring --hosts mac1.local,mac2.local --auto-setup "
    "--output-hostfile hosts.json": ("two Macs over Thunderbolt (ssh to mac1/mac2)", None),
    'mlx.launch --hostfile hosts.json --backend ring --python "$(which python)" -- -m mlx_lm server --model '
    "~/models/xlstm-7b-bf16 --port 8080": (
        "two Macs", 'mlx.launch -n 2 --backend ring --python "$(which python)" -- -m mlx_lm server --model '
        "~/models/xlstm-7b-bf16 --port 8080"),
    'mlx.launch --hostfile hosts.json --backend ring --python "$(which python)" -- -m mlx_lm chat --model '
    "~/models/xlstm-7b-bf16 --pipeline": (
        "two Macs", 'mlx.launch -n 2 --backend ring --python "$(which python)" -- -m mlx_lm chat --model '
        "~/models/xlstm-7b-bf16 --pipeline"),
    'mlx.launch --backend nccl -n 2 --python "$(which python)" -- -m mlx_lm server --model ~/models/xlstm-7b-bf16 '
    "--port 8080": (
        "two NVIDIA GPUs (NCCL)", 'mlx.launch --backend ring -n 2 --python "$(which python)" -- -m mlx_lm server '
        "--model ~/models/xlstm-7b-bf16 --port 8080"),
    "python tools/bench_distributed.py all --dir /tmp/xlstm-7b --shape 7b --backend nccl -n 2": (
        "two NVIDIA GPUs (NCCL) and 14 GB of weights per run; the stand-in is fp32, as a tiny random model in "
        "bf16 has exact top-2 ties that the tool counts as a difference",
        "python tools/bench_distributed.py all --dir bench-tiny --shape tiny --dtype float32 --backend ring -n 2 "
        "--prompt-tokens 64 --max-tokens 16"),
    # Publishing
    "python upload_scripts/publish.py NX-AI/xLSTM-7b --org mlx-community    # bf16, 8bit, 4bit, mixed_3_6": (
        "a Hub token, the network and NX-AI/xLSTM-7b",
        "python upload_scripts/publish.py demo/xlstm-stdlib --org mlx-community --license apache-2.0 --variants bf16 "
        "8bit --no-eval --dry-run"),
}
# A placeholder for the reader's own data: a tiny train/valid set in mlx-lm's format stands in.
PLACEHOLDERS = {"DATA_DIR": "lora-data"}


def readme_commands() -> list:
    """(kind, text) in README order: kind "shell" for a command line, "python" for a fence."""
    found, fence, block, previous_blank, in_block = [], None, [], True, False
    for line in README.read_text().splitlines():
        if fence is not None:
            if line.startswith("```"):
                if fence == "python":
                    found.append(("python", "\n".join(block)))
                else:
                    commands = [l for l in block if re.match(r"\s*(\$ |python3? |pip |mlx_lm[. ]|mlx\.launch )", l)]
                    assert not commands, f"a bare ``` fence holds commands: {commands}"
                fence, block = None, []
            else:
                block.append(line)
            continue
        if line.startswith("```"):
            fence = line[3:].strip()
            assert fence in ("", "python"), f"README: a ```{fence} fence; this test reads ```python and bare ones"
            continue
        indented = re.match(r"^ {4,}(\S.*)$", line)
        in_block = bool(indented) and (previous_blank or in_block)
        previous_blank = not line.strip()
        if in_block:
            text = indented.group(1)
            found.append(("shell", text[2:] if text.startswith("$ ") else text))
            continue
        for span in re.findall(r"`([^`]+)`", line):
            if COMMAND.match(span) and not re.fullmatch(r"python3? -m [\w.]+", span):
                found.append(("shell", span))
    return found


def test_the_readme_is_read_right():
    commands = readme_commands()
    shell = [c for k, c in commands if k == "shell"]
    # The first two `    $ ` lines are CI's (.ci/run), in this order.
    ci = re.findall(r"^    \$ (.*)$", README.read_text(), flags=re.M)
    assert shell[:2] == ci[:2] and len(ci) == 2
    assert sum(k == "python" for k, _ in commands) == 1
    # Every listed exception is still in the README (none stale), each with its reason.
    assert sorted(set(NOT_HERE) - set(shell) - {"PYTHON"}) == []
    assert all(reason for reason, _ in NOT_HERE.values())
    # Every lora line says how many layers (mlx-lm's default of 16 exceeds small stacks).
    assert all("--num-layers" in c for c in shell if re.search(r"\blora\b", c))
    # Every generate line is raw completion; mlx.launch lines name the python to run.
    assert all("--ignore-chat-template" in c for c in shell if re.search(r"\bgenerate --model", c))
    assert all('--python "$(which python)"' in c for c in shell if c.startswith("mlx.launch"))


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    work = tmp_path_factory.mktemp("readme")
    for name in LINKED:
        (work / name).symlink_to(ROOT / name)
    (work / "home").mkdir()
    data = work / PLACEHOLDERS["DATA_DIR"]
    data.mkdir()
    rows = [json.dumps({"text": f"def f{i}(x):\n    return x + {i}\n"}) for i in range(32)]
    (data / "train.jsonl").write_text("\n".join(rows))
    (data / "valid.jsonl").write_text("\n".join(rows[:8]))
    return work


def environment(work: Path) -> dict:
    return {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "HOME": str(work / "home"),
            "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "COLUMNS": "100"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_server(command: str, work: Path, timeout: float = 120):
    """Start it (own process group), wait for the port, ask one completion, stop the group."""
    port = free_port()
    command = re.sub(r"--port \d+", f"--port {port}", command)
    proc = subprocess.Popen(["bash", "-c", command], cwd=work, env=environment(work), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + timeout
        while True:
            assert proc.poll() is None, f"{command} exited early:\n{proc.stdout.read()}"
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                    break
            except OSError:
                assert time.monotonic() < deadline, f"{command}: no server on port {port} after {timeout} s"
                time.sleep(0.3)
        body = json.dumps({"prompt": "def", "max_tokens": 8, "temperature": 0.0}).encode()
        request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", data=body,
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as response:
            answer = json.loads(response.read())
        assert answer["usage"]["completion_tokens"] == 8, answer
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def run(command: str, work: Path, timeout: float = 180):
    for placeholder, stand_in in PLACEHOLDERS.items():
        command = command.replace(placeholder, stand_in)
    if re.search(r"\bserver\b", command):
        return run_server(command, work)
    chat = re.search(r"\bchat\b", command) is not None
    proc = subprocess.run(["bash", "-c", command], cwd=work, env=environment(work), capture_output=True, text=True,
                          timeout=timeout, input="hello\nq\n" if chat else None)
    assert proc.returncode == 0, f"{command}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    if chat:
        assert re.search(r"\d+ tokens", proc.stdout), proc.stdout[-2000:]


# What runs: each command as written, or its stand-in (those without one are only listed above).
COMMANDS = [(k, c) for k, c in readme_commands() if NOT_HERE.get(c, ("", ""))[1] is not None]


@pytest.mark.parametrize("kind, command", COMMANDS, ids=[f"{n:02d}-{c.split()[0] if k == 'shell' else 'python'}"
                                                         for n, (k, c) in enumerate(COMMANDS)])
def test_readme_command(scratch, kind, command):
    if kind == "python":
        code = command.replace('"NX-AI/xLSTM-7b"', repr(str(DEMO_PY)))
        assert code != command, "the README's Python no longer loads NX-AI/xLSTM-7b: update NOT_HERE['PYTHON']"
        proc = subprocess.run([sys.executable, "-c", code], cwd=scratch, env=environment(scratch),
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0 and proc.stdout.strip(), proc.stderr
        return
    run(NOT_HERE[command][1] if command in NOT_HERE else command, scratch)
