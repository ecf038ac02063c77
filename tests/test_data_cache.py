"""The tokenized cache: the same examples as the in-memory pipeline, keyed on every input, served
memory-mapped; streaming with exact resume; hub datasets from a local cache."""

from __future__ import annotations

import copy
import json
import os
import pickle
import shutil
from pathlib import Path

import pytest

from tunelab.config import build_config
from tunelab.data import cache as cache_module
from tunelab.data.cache import prepare
from tunelab.data.fingerprint import cache_key
from tunelab.data.pipeline import build_data, load_records, split_eval
from tunelab.data.records import Example
from tunelab.data.rows import BatchedIds
from tunelab.data.sources import DatasetRegistry
from tunelab.data.streaming import ExampleStream
from tunelab.data.templates import get_template
from tunelab.data.tokenize import encode_records
from tunelab.data.views import ExampleView
from tunelab.errors import ConfigError, DataError

FIXTURES = Path(__file__).parent / "fixtures" / "llamafactory"


def config(tmp_path: Path, stage: str = "sft", train: list[str] | None = None, seed: int = 42, **data):
    data = {"dataset_dir": str(FIXTURES), "template": "chatml", "cache_dir": str(tmp_path / "cache"),
            "num_workers": 1, **data}
    return build_config({"stage": stage, "data": {"train": train or ["identity"], **data}, "train": {"seed": seed}})


def reference(cfg, tokenizer):
    """The in-memory pipeline: records -> mix -> eval split -> encode_records."""
    data = cfg.data
    template = get_template(data.template, tokenizer, system=data.system)
    records = load_records(data.train, data, cfg.train.seed, {}, data.weights, cfg.stage)
    train, held = split_eval(records, data.eval_split, cfg.train.seed)
    if data.eval:
        held = load_records(data.eval, data, cfg.train.seed, {}, stage=cfg.stage)
    options = dict(template=template, tokenizer=tokenizer, stage=cfg.stage, max_length=data.max_length,
                   train_on_prompt=data.train_on_prompt, mask_history=data.mask_history,
                   separate_documents=data.separate_documents)
    examples, stats = encode_records(train, **options)
    return examples, (encode_records(held, **options)[0] if held else []), stats


CASES = [
    ("sft", ["identity", "glaive_toolcall_demo", "support_chat_demo"], {}),
    ("sft", ["identity", "support_chat_demo"], {"weights": [3.0, 1.0], "eval_split": 0.3, "train_on_prompt": True}),
    ("sft", ["identity", "glaive_toolcall_demo"], {"max_length": 40, "mask_history": True, "max_samples": 2}),
    ("dpo", ["dpo_en_demo", "dpo_alpaca_demo"], {"eval_split": 2}),
    ("rm", ["dpo_en_demo"], {"max_length": 30}),
    ("kto", ["kto_en_demo"], {"eval": ["kto_en_demo"], "system": "Be brief."}),
    ("pt", ["c4_demo", "wiki_demo"], {"max_length": 16}),
    ("pt", ["c4_demo", "wiki_demo"], {"max_length": 16, "separate_documents": False, "eval_split": 0.34}),
    ("ppo", ["identity", "dpo_en_demo"], {"max_length": 60}),
]


@pytest.mark.parametrize("stage, names, data", CASES)
def test_cached_examples_equal_the_in_memory_pipeline(tmp_path, tokenizer, stage, names, data):
    cfg = config(tmp_path, stage, names, **data)
    bundle = build_data(cfg, tokenizer)
    train, held, stats = reference(cfg, tokenizer)
    assert list(bundle.train) == train and list(bundle.eval) == held
    assert [bundle.train[i] for i in range(len(train))] == train
    assert (bundle.stats["examples"], bundle.stats["tokens"], bundle.stats["supervised_tokens"],
            bundle.stats["truncated"], bundle.stats["dropped"]) == (stats.examples, stats.tokens,
                                                                    stats.supervised_tokens, stats.truncated,
                                                                    stats.dropped)
    assert list(bundle.train.lengths) == [_length(e) for e in train]


def _length(example) -> int:
    from tunelab.data.columns import example_length

    return example_length(example)


def test_second_build_is_a_cache_hit_and_reads_no_data(tmp_path, tokenizer, monkeypatch):
    cfg = config(tmp_path, train=["identity", "support_chat_demo"])
    first = build_data(cfg, tokenizer)
    monkeypatch.setattr(cache_module, "_build", lambda *a, **k: pytest.fail("the cache was rebuilt"))
    again = build_data(cfg, tokenizer)
    assert again.cache_dir == first.cache_dir and list(again.train) == list(first.train)
    assert prepare(cfg, tokenizer, again.template).hit


def test_view_indexes_like_a_list_and_pickles_as_its_path(tmp_path, tokenizer):
    view = build_data(config(tmp_path, train=["identity"]), tokenizer).train
    items = list(view)
    assert isinstance(view, ExampleView) and len(view) == 3 and isinstance(view[0], Example)
    assert view[-1] == items[2] and view[1:] == items[1:]
    with pytest.raises(IndexError):
        view[3]
    assert list(pickle.loads(pickle.dumps(view))) == items
    assert view.lengths.dtype.itemsize == 4
    # rows are read with pread: no mapping of the file stays, so reading never grows the resident set
    assert str(view.path) not in Path("/proc/self/maps").read_text()


def _key(tmp_path, tokenizer, stage="sft", template="chatml", **data):
    cfg = config(tmp_path, stage, ["identity"], template=template, **data)
    registry = DatasetRegistry(cfg.data.dataset_dir)
    spec = [registry.resolve(name) for name in cfg.data.train]
    return cache_key(cfg, tokenizer, get_template(template, tokenizer, system=cfg.data.system), spec, [])[0]


@pytest.mark.parametrize("change", [
    {"max_length": 100}, {"system": "Be brief."}, {"train_on_prompt": True}, {"mask_history": True},
    {"max_samples": 2}, {"eval_split": 1}, {"on_error": "skip"}, {"template": "llama3"}, {"stage": "ppo"},
])
def test_each_content_setting_changes_the_key(tmp_path, tokenizer, change):
    assert _key(tmp_path, tokenizer, **change) != _key(tmp_path, tokenizer)


def test_settings_that_only_change_reading_keep_the_key(tmp_path, tokenizer):
    base = _key(tmp_path, tokenizer)
    assert _key(tmp_path, tokenizer, num_workers=2, packing=True, group_by_length=False, pad_to_multiple_of=8,
                cache_dir=str(tmp_path / "elsewhere")) == base


def test_tokenizer_seed_and_data_file_invalidate(tmp_path, tokenizer):
    data_dir = tmp_path / "data"
    shutil.copytree(FIXTURES, data_dir)
    cfg = config(tmp_path, train=["identity"], dataset_dir=str(data_dir), eval_split=1)
    first = build_data(cfg, tokenizer).cache_dir
    assert build_data(cfg, tokenizer).cache_dir == first
    reseeded = config(tmp_path, train=["identity"], dataset_dir=str(data_dir), eval_split=1, seed=7)
    assert build_data(reseeded, tokenizer).cache_dir != first
    grown = copy.deepcopy(tokenizer)
    grown.add_tokens(["<extra_token>"])
    assert build_data(cfg, grown).cache_dir != first
    records = json.loads((data_dir / "identity.json").read_text())
    records[0]["output"] = "A different answer."
    (data_dir / "identity.json").write_text(json.dumps(records))
    changed = build_data(cfg, tokenizer)
    assert changed.cache_dir != first
    assert any("A different answer." in tokenizer.decode(e.input_ids) for e in [*changed.train, *changed.eval])


def test_batched_ids_answer_like_the_tokenizer(tokenizer):
    texts = ["<|im_start|>user\nHello there<|im_end|>\n", "Waves fold silver", ""]
    expected = tokenizer(texts, add_special_tokens=False)["input_ids"]
    ids = BatchedIds(tokenizer)
    assert ids(texts, add_special_tokens=False)["input_ids"] == expected  # nothing fetched: tokenized when asked
    ids.record()
    assert ids(texts[:2], add_special_tokens=False)["input_ids"] == [[], []]  # first pass: only noted
    ids.fetch()
    assert ids(texts[1], add_special_tokens=False)["input_ids"] == expected[1]
    assert ids(texts, add_special_tokens=False)["input_ids"] == expected  # "" was not foreseen
    assert ids("Hi", add_special_tokens=True)["input_ids"] == tokenizer("Hi")["input_ids"]
    assert ids.eos_token_id == tokenizer.eos_token_id


# --------------------------------------------------------------------------- bad records


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))
    return path


def test_bad_record_names_file_line_and_field(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", [{"instruction": "q", "output": "a"}, "",
                                              {"instruction": "q2", "output": 5}])
    with pytest.raises(DataError) as info:
        build_data(config(tmp_path, train=[str(path)]), tokenizer)
    assert (info.value.file, info.value.line, info.value.field) == (str(path), 3, "output")
    assert str(info.value).startswith(f"file {path}, line 3, field 'output': the value is a number")


def test_skip_counts_bad_records_with_their_reasons(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", [{"instruction": "q", "output": "a"}, {"instruction": "q2"},
                                              {"instruction": "q3", "output": "b"}])
    bundle = build_data(config(tmp_path, train=[str(path)], on_error="skip"), tokenizer)
    assert len(bundle.train) == 2 and bundle.stats["skipped"] == 1
    assert bundle.stats["skip_reasons"] == [f"file {path}, line 2, field 'output': the field is missing; alpaca "
                                            "records need 'instruction', 'output'. Fix the record, map the right "
                                            "column in the dataset's dataset_info.json entry, or set "
                                            "data.on_error=skip to drop bad records."]


def test_csv_errors_name_the_line_a_quoted_row_starts_on(tmp_path, tokenizer):
    path = tmp_path / "d.csv"
    path.write_text('instruction,output\n"two\nlines",fine\nthird,\n')
    with pytest.raises(DataError, match=rf"file {path}, line 4, field 'output': the text is empty"):
        build_data(config(tmp_path, train=[str(path)]), tokenizer)


def test_a_worker_error_stops_the_parallel_map_and_keeps_its_location(tmp_path, tokenizer):
    rows = [{"instruction": f"q{i}", "output": f"a{i}"} for i in range(2400)]
    rows[2100] = {"instruction": "q", "output": ["not", "text"]}
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    with pytest.raises(DataError) as info:
        build_data(config(tmp_path, train=[str(path)], num_workers=2), tokenizer)
    assert (info.value.line, info.value.field) == (2101, "output")
    assert not list((tmp_path / "cache").glob("sft-*/meta.json"))  # nothing half-built is left as a cache


def test_parallel_map_gives_the_same_examples(tmp_path, tokenizer):
    rows = [{"instruction": f"question {i}", "output": f"answer {i}"} for i in range(2400)]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    one = build_data(config(tmp_path, train=[str(path)]), tokenizer)
    two = build_data(config(tmp_path / "2", train=[str(path)], num_workers=2), tokenizer)
    assert one.cache_dir.name == two.cache_dir.name and list(one.train) == list(two.train)


def test_max_samples_tokenizes_only_a_window(tmp_path, tokenizer, monkeypatch):
    path = write_jsonl(tmp_path / "d.jsonl", [{"instruction": f"q{i}", "output": f"a{i}"} for i in range(5000)])
    seen = []
    original = cache_module.RowEncoder.__call__
    monkeypatch.setattr(cache_module.RowEncoder, "__call__",
                        lambda self, batch, indices: seen.append(len(indices)) or original(self, batch, indices))
    bundle = build_data(config(tmp_path, train=[str(path)], max_samples=10), tokenizer)
    assert len(bundle.train) == 10 and sum(seen) == cache_module.MAP_BATCH


def test_no_example_left_is_a_config_error_and_caches_nothing(tmp_path, tokenizer):
    with pytest.raises(ConfigError, match="no training examples are left"):
        build_data(config(tmp_path, "dpo", ["dpo_en_demo"], max_length=12), tokenizer)
    assert not list((tmp_path / "cache").glob("dpo-*"))


# --------------------------------------------------------------------------- streaming


def stream_config(tmp_path: Path, stage: str, path: Path, **data):
    return config(tmp_path, stage, [str(path)], streaming=True, shuffle_buffer=40, **data)


@pytest.mark.parametrize("stage, data", [("sft", {}), ("pt", {"max_length": 12}),
                                         ("pt", {"max_length": 12, "separate_documents": False})])
def test_streaming_resumed_after_a_kill_continues_at_the_same_example(tmp_path, tokenizer, stage, data):
    if stage == "sft":
        path = write_jsonl(tmp_path / "d.jsonl", [{"instruction": f"q {i}", "output": "w " * (i % 5 + 1)}
                                                  for i in range(300)])
    else:
        path = tmp_path / "d.txt"
        path.write_text("".join(f"doc {i} " + "w " * (i % 9) + "\n" for i in range(300)))
    cfg = stream_config(tmp_path, stage, path, **data)
    stream = ExampleStream(cfg, tokenizer)
    epoch, states = [], []
    for example in stream:
        epoch.append(example)
        states.append(json.dumps(stream.state_dict()))  # what a checkpoint stores
    for k in (0, 39, 40, 41, 150, len(epoch) - 2):
        resumed = ExampleStream(cfg, tokenizer)
        resumed.load_state_dict(json.loads(states[k]))
        assert list(resumed) == epoch[k + 1:]
    assert list(stream) != epoch  # the next epoch is shuffled differently


def test_streaming_sft_shuffles_within_windows_and_keeps_every_example(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", [{"instruction": f"q {i}", "output": f"a {i}"} for i in range(100)])
    streamed = list(ExampleStream(stream_config(tmp_path, "sft", path), tokenizer))
    cached = list(build_data(config(tmp_path, train=[str(path)]), tokenizer).train)
    key = lambda e: e.input_ids  # noqa: E731
    assert streamed != cached and sorted(streamed, key=key) == sorted(cached, key=key)
    assert sorted(map(key, streamed[:40])) == sorted(map(key, cached[:40]))  # a window holds 40


def test_streaming_pt_blocks_cover_the_documents(tmp_path, tokenizer):
    path = tmp_path / "d.txt"
    path.write_text("".join(f"document number {i}\n" for i in range(50)))
    cfg = stream_config(tmp_path, "pt", path, max_length=10, separate_documents=False)
    blocks = list(ExampleStream(cfg, tokenizer))
    cached = build_data(cfg.model_copy(update={"data": cfg.data.model_copy(update={"streaming": False})}), tokenizer)
    assert sum(len(b.input_ids) for b in blocks) == cached.stats["tokens"]
    assert all(len(b.input_ids) == 10 for b in blocks[:-1]) and all(b.labels[0] == -100 for b in blocks)
    eos = tokenizer.eos_token_id
    ids = [t for block in blocks for t in block.input_ids]
    ids += [] if ids[-1] == eos else [eos]  # a last block of one token (an eos) has nothing to predict
    docs = [tokenizer(f"document number {i}", add_special_tokens=False)["input_ids"] + [eos] for i in range(50)]
    assert sorted(map(tuple, _split_at(ids, eos))) == sorted(map(tuple, docs))


def _split_at(ids: list[int], eos: int) -> list[list[int]]:
    docs, current = [], []
    for token in ids:
        current.append(token)
        if token == eos:
            docs.append(current)
            current = []
    return docs


@pytest.mark.parametrize("data, message", [({"weights": [1.0]}, "data.weights cannot be used"),
                                           ({"eval_split": 0.1}, "data.eval_split cannot be used")])
def test_streaming_refuses_what_it_cannot_do(tmp_path, tokenizer, data, message):
    with pytest.raises(ConfigError, match=message):
        ExampleStream(stream_config(tmp_path, "sft", FIXTURES / "identity.json", **data), tokenizer)
    with pytest.raises(ConfigError, match="serves stages pt and sft"):
        ExampleStream(stream_config(tmp_path, "dpo", FIXTURES / "dpo_en_demo.json"), tokenizer)
    with pytest.raises(ConfigError, match="open_stream"):
        build_data(stream_config(tmp_path, "sft", FIXTURES / "identity.json"), tokenizer)


# --------------------------------------------------------------------------- hub datasets


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """A datasets cache holding 'tunelab-test/alpaca_mini' as a download would leave it (no network)."""
    import datasets
    from datasets.packaged_modules.json.json import Json

    from tunelab.data import hub

    cache = tmp_path / "hf-datasets"
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(cache))
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    hub.hub_dataset.cache_clear()
    source = write_jsonl(tmp_path / "alpaca_mini.jsonl",
                         [{"instruction": f"hub question {i}", "output": f"hub answer {i}"} for i in range(4)])
    builder = Json(cache_dir=str(tmp_path / "build"), dataset_name="alpaca_mini", config_name="default",
                   data_files={"train": str(source)})
    builder.download_and_prepare()
    shutil.copytree(builder.cache_dir, cache / "tunelab-test___alpaca_mini" / "default" / "0.0.0" / "0123abcd")
    yield cache
    hub.hub_dataset.cache_clear()


def test_hub_dataset_by_name_loads_from_the_local_cache_offline(tmp_path, tokenizer, hub_cache):
    bundle = build_data(config(tmp_path, train=["tunelab-test/alpaca_mini"]), tokenizer)
    assert len(bundle.train) == 4
    assert "hub answer 3" in tokenizer.decode(bundle.train[3].input_ids)


def test_hf_hub_url_entry_loads_and_a_missing_one_explains(tmp_path, tokenizer, hub_cache):
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    (data_dir / "dataset_info.json").write_text(json.dumps({
        "mini": {"hf_hub_url": "tunelab-test/alpaca_mini"}, "gone": {"hf_hub_url": "tunelab-test/absent"}}))
    bundle = build_data(config(tmp_path, train=["mini"], dataset_dir=str(data_dir)), tokenizer)
    assert len(bundle.train) == 4
    with pytest.raises(DataError, match="dataset 'gone' is only available from hf_hub_url 'tunelab-test/absent', "
                                        "and it cannot be downloaded here: HF_HUB_OFFLINE is set"):
        build_data(config(tmp_path, train=["gone"], dataset_dir=str(data_dir)), tokenizer)


def test_unknown_hub_id_explains_all_three_lookups(tmp_path, tokenizer, hub_cache):
    with pytest.raises(DataError, match=r"'someone/nothing' is neither a dataset in .* nor an existing file or "
                                        r"directory, nor a Hugging Face Hub dataset available here"):
        build_data(config(tmp_path, train=["someone/nothing"]), tokenizer)


def test_saved_dataset_directory_is_read_with_its_split(tmp_path, tokenizer):
    import datasets

    rows = {"instruction": ["a", "b"], "output": ["x", "y"]}
    datasets.DatasetDict({"train": datasets.Dataset.from_dict(rows)}).save_to_disk(str(tmp_path / "saved"))
    bundle = build_data(config(tmp_path, train=[str(tmp_path / "saved")]), tokenizer)
    assert [tokenizer.decode(e.input_ids).count("assistant") for e in bundle.train] == [1, 1]
    assert os.path.isfile(bundle.cache_dir / "train.arrow")


def test_open_stream_streams_train_and_prepares_eval(tmp_path, tokenizer):
    from tunelab.data.streaming import open_stream

    path = write_jsonl(tmp_path / "d.jsonl", [{"instruction": f"q {i}", "output": f"a {i}"} for i in range(50)])
    bundle = open_stream(stream_config(tmp_path, "sft", path, eval=["identity"]), tokenizer)
    assert isinstance(bundle.train, ExampleStream) and len(list(bundle.train)) == 50
    assert isinstance(bundle.eval, ExampleView) and len(bundle.eval) == 3


def test_an_unwritable_cache_directory_is_a_config_error(tmp_path, tokenizer):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(ConfigError, match=rf"the data cache directory {blocker}/sub cannot be written"):
        build_data(config(tmp_path, cache_dir=str(blocker / "sub")), tokenizer)


def test_data_prepare_and_preview_commands(tmp_path, tiny_model_dir):
    import yaml
    from typer.testing import CliRunner

    from tunelab.cli import app

    run_file = tmp_path / "run.yaml"
    run_file.write_text(yaml.safe_dump({"model": {"name_or_path": str(tiny_model_dir)}, "data": {
        "dataset_dir": str(FIXTURES), "train": ["identity"], "eval_split": 1, "cache_dir": str(tmp_path / "c")}}))
    prepared = CliRunner().invoke(app, ["data", "prepare", str(run_file)])
    assert prepared.exit_code == 0, prepared.output
    assert "records            2 train, 1 eval" in prepared.output
    assert "examples           2 train, 1 eval" in prepared.output and f"cache              {tmp_path / 'c'}/sft-" \
        in prepared.output
    shown = CliRunner().invoke(app, ["data", "preview", str(run_file), "-n", "1"])
    assert shown.exit_code == 0, shown.output
    assert f"--- example 1: {FIXTURES / 'identity.json'}#0" in shown.output
    assert "assistant\n[[I am Tunebot, a small assistant fine-tuned with tunelab.<|im_end|>]]" in shown.output
    assert "--- example 2" not in shown.output
