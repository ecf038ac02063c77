"""Hugging Face Hub datasets: ``hf_hub_url`` entries of ``dataset_info.json`` and ``org/name`` in data.train.

Loading goes through ``datasets.load_dataset``, so a hub dataset is downloaded once into the
Hugging Face cache (``HF_HOME`` / ``HF_DATASETS_CACHE``) and memory-mapped from there; with
``HF_HUB_OFFLINE=1`` the cached copy is used without any network access. Why a failure is
reported as :class:`HubUnavailable` rather than a finished message: the caller knows what the
user asked for (a registry entry, a name in data.train) and phrases the error around it.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

from tunelab.errors import DataError

@dataclass(frozen=True)
class HubSource:
    """One split of a hub dataset (``subset`` is the dataset's config name, ``data_dir`` a folder in it)."""

    repo: str
    subset: str | None = None
    split: str = "train"
    data_dir: str | None = None

    @property
    def label(self) -> str:
        """How rows of this source are named in messages, e.g. ``hf://org/name[train]``."""
        subset = f"/{self.subset}" if self.subset else ""
        return f"hf://{self.repo}{subset}[{self.split}]"


class HubUnavailable(DataError):
    """The hub dataset cannot be loaded here; ``reason`` says why in a clause."""

    def __init__(self, source: HubSource, reason: str):
        self.reason = reason
        super().__init__(f"the Hugging Face Hub dataset '{source.repo}' cannot be loaded: {reason}")


def quiet_datasets() -> Any:
    """``datasets``, imported on first use (it is slow to import) and kept quiet: its per-load progress
    bars and cache notices would bury tunelab's own output."""
    import datasets

    datasets.utils.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    return datasets


def _reason(err: Exception) -> str:
    """One clause for why ``load_dataset`` failed."""
    import datasets

    if datasets.config.HF_HUB_OFFLINE:
        return (f"HF_HUB_OFFLINE is set and it is not in the local datasets cache "
                f"({datasets.config.HF_DATASETS_CACHE})")
    if isinstance(err, ConnectionError):
        return f"the Hub cannot be reached ({err})"
    return f"{type(err).__name__}: {err}"


@functools.lru_cache(maxsize=32)
def hub_dataset(source: HubSource) -> Any:
    """The split as a memory-mapped ``datasets.Dataset`` (downloaded once, then served from the cache)."""
    datasets = quiet_datasets()
    try:
        return datasets.load_dataset(source.repo, name=source.subset, data_dir=source.data_dir,
                                     split=source.split)
    except Exception as err:  # datasets raises many unrelated types (network, hub, splits, files)
        raise HubUnavailable(source, _reason(err)) from None


def hub_iterable(source: HubSource) -> Any:
    """The split as a ``datasets.IterableDataset``: streamed from the Hub when online (nothing
    materialised on disk), the cached copy when offline."""
    datasets = quiet_datasets()
    if datasets.config.HF_HUB_OFFLINE:
        return hub_dataset(source).to_iterable_dataset()
    try:
        return datasets.load_dataset(source.repo, name=source.subset, data_dir=source.data_dir,
                                     split=source.split, streaming=True)
    except Exception as err:
        raise HubUnavailable(source, _reason(err)) from None
