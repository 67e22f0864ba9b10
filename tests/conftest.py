"""Shared fixtures: a tiny random chat model built once per session, and backends over it."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from sgl_adaptive.tiny_model import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="session")
def backend(tiny_model_dir: Path):
    """The in-process backend on the tiny model (shared: tests reseed through ``run``)."""
    from sgl_adaptive.backends.local import LocalBackend

    b = LocalBackend.from_pretrained(str(tiny_model_dir), device="cpu")
    yield b
    b.shutdown()


@pytest.fixture()
def endless_backend(tiny_model_dir: Path):
    """A backend whose model never ends a turn: every sample runs to its token budget."""
    from sgl_adaptive.backends.local import LocalBackend

    b = LocalBackend.from_pretrained(str(tiny_model_dir), device="cpu")
    b.engine.eos_token_ids = frozenset()
    yield b
    b.shutdown()


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models run faster on one thread (and far faster when the machine is shared): modules that
    train or sample a lot use it with ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def reward_model_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random sequence-classification reward model (one logit) with the tiny tokenizer."""
    import torch
    from transformers import AutoConfig, AutoTokenizer, Qwen2ForSequenceClassification

    out = tmp_path_factory.mktemp("rm") / "reward"
    config = AutoConfig.from_pretrained(tiny_model_dir)
    config.num_labels = 1
    torch.manual_seed(1)
    Qwen2ForSequenceClassification(config).save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(out)
    return out
