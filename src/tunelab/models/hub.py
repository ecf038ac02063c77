"""Base models from the Hugging Face hub: ``model.name_or_path: org/name``.

Downloads go through ``huggingface_hub.snapshot_download`` into the standard hub cache, so
everything that library honours applies unchanged: ``HF_HOME`` / ``HF_HUB_CACHE`` (where the
cache is), ``HF_HUB_OFFLINE=1`` (use the cache, never the network), ``HF_TOKEN`` (private and
gated repositories), ``HF_ENDPOINT`` (a mirror). A model downloaded by ``transformers`` or
``hf download`` is reused, and the reverse.

Only what a model directory needs is fetched: the top-level configs, tokenizer files and
safetensors weights (or the one GGUF file named by ``model.gguf_file``). Pickled ``.bin``
weights are never downloaded: loading them can run code.
"""

from __future__ import annotations

import functools
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from tunelab.errors import ConfigError, TunelabError

#: Files of a model directory, at the top level of the repository only (``*/*`` is ignored:
#: repositories keep ONNX exports, original checkpoints and GGUF variants in sub-folders).
MODEL_FILES = ["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja", "*.tiktoken", "*.py"]
_SUBFOLDERS = ["*/*"]


def is_hub_id(name: str) -> bool:
    """``org/name`` as the hub spells repository ids (a local path that exists is never one)."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if name.count("/") != 1 or Path(name).expanduser().exists():
        return False
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def hub_cache_dir() -> Path:
    """The hub cache this process uses (``HF_HUB_CACHE``, else ``HF_HOME/hub``)."""
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


@contextmanager
def _progress_shown() -> Iterator[None]:
    """Download progress bars on for the block: the CLI silences library bars, but a download
    of gigabytes without progress looks like a hang. ``HF_HUB_DISABLE_PROGRESS_BARS=1`` still wins."""
    from huggingface_hub import constants
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    if are_progress_bars_disabled() and constants.HF_HUB_DISABLE_PROGRESS_BARS is not True:
        enable_progress_bars()
        try:
            yield
        finally:
            disable_progress_bars()
    else:
        yield


def hub_snapshot(repo_id: str, revision: str | None = None, gguf_file: str | None = None) -> Path:
    """The local snapshot directory of ``repo_id`` at ``revision``, downloaded if needed.

    Cached per process (keyed by the cache directory too), so loading the model and its
    tokenizer asks the hub once.
    """
    return _snapshot(repo_id, revision, gguf_file, str(hub_cache_dir()))


@functools.lru_cache(maxsize=32)
def _snapshot(repo_id: str, revision: str | None, gguf_file: str | None, cache_dir: str) -> Path:
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import (GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError,
                                        RepositoryNotFoundError, RevisionNotFoundError)

    where = f"the Hugging Face hub repository '{repo_id}'" + (f" (revision '{revision}')" if revision else "")
    tried = (f"model.name_or_path '{repo_id}' is not a local directory, a .gguf file or an embedded model, so "
             f"tunelab looked for {where}")
    patterns = dict(allow_patterns=[gguf_file], ignore_patterns=None) if gguf_file else \
        dict(allow_patterns=MODEL_FILES, ignore_patterns=_SUBFOLDERS)
    try:
        with _progress_shown():
            directory = Path(snapshot_download(repo_id, revision=revision, cache_dir=cache_dir, **patterns))
    except RevisionNotFoundError:
        raise ConfigError(f"{tried}: it has no revision '{revision}'. Fix model.revision (a branch, tag or "
                          "commit of that repository), or leave it out for 'main'.") from None
    except GatedRepoError:
        raise TunelabError(f"{tried}: it is gated. Accept its conditions on its hub page, then log in with "
                           "`hf auth login` or set HF_TOKEN.") from None
    except RepositoryNotFoundError:
        raise ConfigError(f"{tried}, which does not exist or is private. Check the id (or, if you meant a local "
                          f"path, {Path(repo_id).resolve()} does not exist); for a private repository log in with "
                          "`hf auth login` or set HF_TOKEN.") from None
    except LocalEntryNotFoundError as err:  # also a cached copy that is known to be incomplete
        if constants.HF_HUB_OFFLINE:
            reason = ("it is not (completely) in the hub cache, and HF_HUB_OFFLINE=1 forbids downloading it. Run "
                      f"once with network access (unset HF_HUB_OFFLINE), or `hf download {repo_id}`")
        else:
            cause = str(err.__cause__ or err).strip().splitlines()[0]
            reason = (f"it is not (completely) in the hub cache, and the hub cannot be reached ({cause}). Check the "
                      "network connection")
        raise TunelabError(f"{tried}: {reason}; or set HF_HOME / HF_HUB_CACHE to the cache that holds it "
                           f"(this process reads {cache_dir}).") from None
    except HfHubHTTPError as err:
        raise TunelabError(f"{tried}, and the hub answered with an error: {err}. Try again later, or download "
                           "the model yourself and pass its local directory.") from None
    _check_snapshot(directory, repo_id, gguf_file)
    return directory


def _check_snapshot(directory: Path, repo_id: str, gguf_file: str | None) -> None:
    """What was downloaded can be loaded: the GGUF file asked for, or a config and safetensors weights."""
    if gguf_file is not None:
        if not (directory / gguf_file).is_file():
            raise ConfigError(f"model.gguf_file '{gguf_file}' is not in the hub repository '{repo_id}'. Check the "
                              "file name on its hub page (files in sub-folders are named with their folder).")
        return
    if not (directory / "config.json").is_file():
        ggufs = sorted(p.name for p in directory.glob("*.gguf"))
        hint = f" It holds GGUF files {ggufs}: set model.gguf_file." if ggufs else " Set model.gguf_file if it " \
                                                                                    "holds GGUF files."
        raise ConfigError(f"the hub repository '{repo_id}' has no config.json, so it is not a transformers "
                          f"model.{hint}")
    if not any(directory.glob("*.safetensors")):
        raise ConfigError(f"the hub repository '{repo_id}' has no .safetensors weights at its top level. tunelab "
                          "does not load pickled (.bin) weights, which can run code when loaded: use a "
                          "repository that ships safetensors (most do), or convert the weights yourself.")
