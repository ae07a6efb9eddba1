"""Publish an xLSTM checkpoint to the Hugging Face Hub as mlx-community-ready MLX models.

    python upload_scripts/publish.py NX-AI/xLSTM-7b --org mlx-community
    python upload_scripts/publish.py ./xLSTM-7b --base-model NX-AI/xLSTM-7b --dry-run

For each variant (bf16, 8bit, 4bit, mixed_3_6, ...) it runs mlx-lm's own `convert`, measures
perplexity against the source weights and decode speed on this machine, writes a model card,
and uploads the folder (create_repo + upload_folder). Each folder is built in a temporary
one beside it under --out, and all are moved into place only when complete. --dry-run needs no network:
it builds the folders and prints what would be uploaded (in a temporary folder unless --out is given).
"""

import argparse
import contextlib
import io
import platform
import sys
import tempfile
from pathlib import Path

VARIANTS = {
    # name: (bits or None for float, mixed recipe or None)
    "bf16": (None, None),
    "8bit": (8, None),
    "6bit": (6, None),
    "4bit": (4, None),
    "mixed_3_6": (3, "mixed_3_6"),
    "mixed_4_6": (4, "mixed_4_6"),
    "mixed_2_6": (2, "mixed_2_6"),
}
DEFAULT_VARIANTS = ["bf16", "8bit", "4bit", "mixed_3_6"]


class PublishError(Exception):
    """Bad input or an unreachable Hub: the message says what to do."""


def is_repo_id(source: str) -> bool:
    return not Path(source).exists() and source.count("/") == 1 and not source.startswith((".", "/"))


def resolve_source(source: str, dry_run: bool, token=None) -> Path:
    """A local checkpoint folder; a repo id is downloaded (or, offline, taken from the HF cache)."""
    path = Path(source)
    if path.exists():
        if not (path / "config.json").is_file():
            raise PublishError(f"{path}: not a checkpoint folder (no config.json)")
        return path
    if not is_repo_id(source):
        raise PublishError(f"{source}: no such folder, and not a Hugging Face repo id (owner/name)")
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors", "README.md", "LICENSE*", "tokenizer*"]
    try:
        return Path(snapshot_download(source, allow_patterns=patterns, local_files_only=dry_run, token=token))
    except Exception as e:  # LocalEntryNotFoundError offline, HTTP/connection errors online
        if dry_run:
            raise PublishError(
                f"{source} is not in the local Hugging Face cache and --dry-run stays offline: "
                f"download it first (huggingface-cli download {source}) or pass a folder"
            ) from e
        raise PublishError(f"could not download {source}: {e}") from e


def check_hub(token):
    """Fail before the long conversions: a token must exist and the Hub must answer."""
    from huggingface_hub import HfApi, get_token

    token = token or get_token()
    if not token:
        raise PublishError(
            "no Hugging Face token: run `huggingface-cli login`, set HF_TOKEN, or pass --token "
            "(or use --dry-run to build without uploading)"
        )
    api = HfApi(token=token)
    try:
        user = api.whoami()
    except Exception as e:
        raise PublishError(
            f"cannot reach the Hugging Face Hub with this token ({type(e).__name__}: {e}); "
            "check the network and token, or use --dry-run"
        ) from e
    return api, user.get("name", "?")


def convert_variant(source: Path, dst: Path, variant: str, group_size: int):
    from mlx_lm import convert

    bits, recipe = VARIANTS[variant]
    # mlx-lm's own recipes: they find down_proj and lm_head (v_proj is part of qkvo_proj).
    convert(
        str(source), str(dst), dtype="bfloat16", quantize=bits is not None, q_bits=bits, q_group_size=group_size,
        quant_predicate=recipe,
    )


EVAL_WINDOW = 256


def eval_windows(tokenizer, text: str, n_tokens: int):
    """Consecutive windows of the text's tokens, (N, EVAL_WINDOW + 1), as mlx-lm's eval_ppl takes them."""
    import mlx.core as mx

    ids = tokenizer.encode(text)
    n = min(max(1, n_tokens // EVAL_WINDOW), (len(ids) - 1) // (EVAL_WINDOW + 1))
    if n < 1:
        raise PublishError(f"the evaluation text is too short ({len(ids)} tokens, needs {EVAL_WINDOW + 1})")
    return mx.array(ids[: n * (EVAL_WINDOW + 1)]).reshape(n, EVAL_WINDOW + 1)


def perplexity(model, windows) -> tuple:
    """mlx-lm's own perplexity (each window from a fresh state, BOS first): (ppl, standard error)."""
    from mlx_lm.perplexity import eval_ppl

    with contextlib.redirect_stdout(io.StringIO()):
        return eval_ppl(model, windows, batch_size=4)


def decode_speed(model, tokenizer, prompt: str, max_tokens: int) -> dict:
    from mlx_lm import stream_generate

    last = None
    for last in stream_generate(model, tokenizer, prompt, max_tokens=max_tokens):
        pass
    return dict(prompt_tps=round(last.prompt_tps, 1), generation_tps=round(last.generation_tps, 1),
                peak_memory_gb=round(last.peak_memory, 3), tokens=last.generation_tokens)


def machine() -> str:
    import mlx.core as mx

    name = f"{platform.system()} {platform.machine()}, MLX {mx.__version__} on {mx.default_device()}"
    try:
        info = mx.device_info()
        name += f" ({info.get('device_name') or info.get('architecture', '')}, {info['memory_size'] / 2**30:.0f} GiB)"
    except Exception:  # device_info differs between back-ends; the name above suffices
        pass
    return name


def measure(source: Path, folders: dict, text: str, text_name: str, eval_tokens: int, speed_tokens: int,
            prompt: str) -> dict:
    """Perplexity of the source weights and of each variant on the same tokens; decode speed."""
    from mlx_lm import load

    from mlx_lm_xlstm import info

    ref_model, tokenizer = load(str(source))
    windows = eval_windows(tokenizer, text, eval_tokens)
    ppl, se = perplexity(ref_model, windows)
    results = dict(source=dict(perplexity=ppl, se=se, dtype=info.describe(source)["dtype"]),
                   tokens=windows.shape[0] * EVAL_WINDOW, text=text_name)
    del ref_model
    for variant, folder in folders.items():
        model, tokenizer = load(str(folder))
        ppl, se = perplexity(model, windows)
        row = dict(perplexity=ppl, se=se)
        if speed_tokens:
            row.update(decode_speed(model, tokenizer, prompt, speed_tokens))
        results[variant] = row
        del model
    return results


def describe_variant(variant: str, group_size: int) -> str:
    bits, recipe = VARIANTS[variant]
    if bits is None:
        return "bfloat16 weights (unquantized)"
    if recipe:
        return f"mixed {recipe[len('mixed_'):].replace('_', '/')}-bit affine quantization (mlx-lm's {recipe} recipe), group size {group_size}"
    return f"{bits}-bit affine quantization, group size {group_size}"


def card(repo_id: str, variant: str, base_model, license_meta: dict, group_size: int, infos: dict,
         quality, repo_ids: dict, prompt: str, where: str) -> str:
    """mlx_lm_xlstm.card's model card (the one `convert --upload-repo` uploads too), with the
    quality and speed of every variant."""
    from mlx_lm_xlstm import info as model_info
    from mlx_lm_xlstm.card import model_card
    from mlx_lm_xlstm.info import human_bytes

    rows = []
    for name, rid in repo_ids.items():
        v = infos[name]
        q = quality.get(name, {}) if quality else {}
        ppl = f"{q['perplexity']:.3f} ± {q['se']:.3f}" if "perplexity" in q else "—"
        tps = f"{q['generation_tps']:.1f}" if "generation_tps" in q else "—"
        bound = " / ".join(f"{model_info.decode_bound(v, bw):.0f}" for bw in (400, 800))
        me = " (this repo)" if name == variant else ""
        rows.append(f"| [{name}](https://huggingface.co/{rid}){me} | {human_bytes(v['weight_bytes'])} | {ppl} | {tps} | {bound} |")
    quality_note = (
        f"Perplexity (mlx-lm's `eval_ppl`, windows of {EVAL_WINDOW} tokens) on the first {quality['tokens']} tokens "
        f"of {quality['text']}; the source weights ({quality['source']['dtype']}) give "
        f"{quality['source']['perplexity']:.3f} ± {quality['source']['se']:.3f}. "
        f"Decode tok/s measured with mlx-lm's `stream_generate` on {where}."
        if quality else "Quality and speed were not measured for this upload (--no-eval)."
    )
    extra = f"""
## Quality and speed

| variant | weights | perplexity | decode tok/s (measured) | decode bound tok/s at 400 / 800 GB/s |
|---|---|---|---|---|
{chr(10).join(rows)}

{quality_note}
The bound is bandwidth / bytes read per token (weights, one embedding row, state read and
write), from `python -m mlx_lm_xlstm.info`.
"""
    bits = VARIANTS[variant][0]
    return str(model_card(repo_id, infos[variant], describe_variant(variant, group_size), base_model, license_meta,
                          tags=[f"{bits}-bit"] if bits else ["bf16"], prompt=prompt, extra=extra))


def license_metadata(source: Path, license_arg) -> dict:
    """license (and license_name/link for 'other') from --license or the source's model card."""
    if license_arg:
        return {"license": license_arg}
    readme = source / "README.md"
    if readme.is_file():
        from huggingface_hub import ModelCard

        data = ModelCard.load(readme).data.to_dict()
        if data.get("license"):
            return {k: data[k] for k in ("license", "license_name", "license_link") if data.get(k)}
    raise PublishError(f"no license in {readme}: pass --license (e.g. --license apache-2.0)")


def folder_listing(folder: Path) -> list:
    return sorted((f.name, f.stat().st_size) for f in folder.iterdir() if f.is_file())


def build(source: Path, out: Path, name: str, org: str, variants: list, group_size: int, base_model,
          license_meta: dict, evaluation: dict, overwrite: bool) -> dict:
    """Every variant's folder, measured and carded, then moved into out/ all at once."""
    from mlx_lm_xlstm import info as model_info
    from mlx_lm_xlstm.convert import atomic_folder

    repo_ids = {v: f"{org}/{name}-{v}" for v in variants}
    targets = {v: out / f"{name}-{v}" for v in variants}
    existing = [str(t) for t in targets.values() if t.exists()]
    if existing and not overwrite:
        raise PublishError(f"already built: {', '.join(existing)} (pass --overwrite to rebuild)")
    with contextlib.ExitStack() as stack:  # all move into place at the end, or none stays
        folders = {v: stack.enter_context(atomic_folder(targets[v], overwrite)) for v in variants}
        for v, folder in folders.items():
            print(f"[publish] converting {v} -> {repo_ids[v]}", flush=True)
            convert_variant(source, folder, v, group_size)
        infos = {v: model_info.describe(f) for v, f in folders.items()}
        quality = measure(source, folders, **evaluation) if evaluation else None
        where = machine()
        for v, folder in folders.items():
            (folder / "README.md").write_text(
                card(repo_ids[v], v, base_model, license_meta, group_size, infos, quality, repo_ids,
                     (evaluation or {}).get("prompt", "The capital of France is"), where)
            )
    return {repo_ids[v]: targets[v] for v in variants}


def print_plan(built: dict, dry_run: bool):
    verb = "would upload" if dry_run else "uploading"
    grand = 0
    for repo_id, folder in built.items():
        files = folder_listing(folder)
        total = sum(s for _, s in files)
        grand += total
        print(f"{verb} {folder} -> https://huggingface.co/{repo_id} ({total / 1e6:.2f} MB)")
        for name, size in files:
            print(f"    {name:<36} {size:>14,} B")
    print(f"total {grand / 1e6:.2f} MB in {len(built)} repos")


def upload(api, built: dict, private: bool):
    for repo_id, folder in built.items():
        api.create_repo(repo_id=repo_id, repo_type="model", exist_ok=True, private=private)
        api.upload_folder(repo_id=repo_id, folder_path=str(folder), repo_type="model",
                          commit_message="Upload MLX xLSTM model (mlx-lm-xlstm publish)")
        print(f"uploaded https://huggingface.co/{repo_id}", flush=True)


def default_eval_text() -> Path:
    import sysconfig

    return Path(sysconfig.get_paths()["stdlib"]) / "LICENSE.txt"


def main(argv=None):
    p = argparse.ArgumentParser(prog="publish.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", help="checkpoint folder or Hugging Face repo id (e.g. NX-AI/xLSTM-7b)")
    p.add_argument("--org", default="mlx-community", help="Hub namespace of the new repos")
    p.add_argument("--name", help="repo name stem (default: the source's name)")
    p.add_argument("--variants", nargs="+", default=DEFAULT_VARIANTS, choices=list(VARIANTS))
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--out", type=Path, help="where the folders are built (default: ./mlx_models; with --dry-run "
                   "a temporary folder, removed after the listing)")
    p.add_argument("--base-model", help="base_model of the card (default: the source repo id)")
    p.add_argument("--license", help="license of the card (default: the source card's)")
    p.add_argument("--eval-file", type=Path, default=None, help="text for perplexity (default: Python's LICENSE.txt)")
    p.add_argument("--eval-tokens", type=int, default=2048, help="tokens scored (whole windows of 256)")
    p.add_argument("--speed-tokens", type=int, default=128, help="tokens to generate for the speed figure (0: skip)")
    p.add_argument("--prompt", default="The capital of France is", help="prompt of the card's example and the speed run")
    p.add_argument("--no-eval", action="store_true", help="skip perplexity and speed")
    p.add_argument("--token", help="Hugging Face token (default: the logged-in one / HF_TOKEN)")
    p.add_argument("--private", action="store_true")
    p.add_argument("--overwrite", action="store_true", help="replace folders already built under --out")
    p.add_argument("--dry-run", action="store_true", help="build and list, no network")
    a = p.parse_args(argv)
    try:
        api = None
        if not a.dry_run:
            api, user = check_hub(a.token)
            print(f"[publish] logged in to the Hub as {user}", flush=True)
        source = resolve_source(a.source, a.dry_run, a.token)
        base_model = a.base_model or (a.source if is_repo_id(a.source) else None)
        name = a.name or (a.source.split("/")[-1] if is_repo_id(a.source) else source.resolve().name)
        license_meta = license_metadata(source, a.license)
        evaluation = None
        if not a.no_eval:
            text_file = a.eval_file or default_eval_text()
            if not text_file.is_file():
                raise PublishError(f"evaluation text {text_file} not found (pass --eval-file or --no-eval)")
            evaluation = dict(text=text_file.read_text(encoding="utf-8", errors="replace"), text_name=text_file.name,
                              eval_tokens=a.eval_tokens,
                              speed_tokens=a.speed_tokens, prompt=a.prompt)
        with contextlib.ExitStack() as stack:
            out = a.out or (Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="publish-")))
                            if a.dry_run else Path("mlx_models"))
            built = build(source, out, name, a.org, a.variants, a.group_size, base_model, license_meta, evaluation,
                          a.overwrite)
            print_plan(built, a.dry_run)
            if a.dry_run and a.out is None:
                print("(built in a temporary folder, now removed: pass --out DIR to keep the folders)")
            if not a.dry_run:
                upload(api, built, a.private)
        return built
    except PublishError as e:
        p.exit(2, f"error: {e}\n")


if __name__ == "__main__":
    main(sys.argv[1:])
