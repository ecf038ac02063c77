"""Shared fixtures: tiny tokenizer/model (seconds, no network)."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

from tunelab.testing.tiny import save_tiny_model_dir, tiny_llama, tiny_tokenizer  # noqa: E402


@pytest.fixture(scope="session")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture
def model(tokenizer):
    """A fresh tiny Llama (same weights every time: seed 0)."""
    return tiny_llama(len(tokenizer))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny Llama saved as a plain transformers directory."""
    return save_tiny_model_dir(tmp_path_factory.mktemp("tiny-llama"))
