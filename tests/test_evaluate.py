"""tunelab eval on a tiny LoRA run built by hand: perplexity, generation, multiple choice, compare-base."""

import json
import math
from pathlib import Path

import pytest
import torch

from tunelab.config import DataConfig, MethodConfig, ModelConfig, RunConfig, TrainConfig, save_config
from tunelab.data.batching import collate
from tunelab.data.pipeline import build_data
from tunelab.data.records import Message
from tunelab.errors import ConfigError, DataError
from tunelab.evaluate import eval_main
from tunelab.evaluate.choice import plan_questions
from tunelab.evaluate.choice_data import load_choice_data
from tunelab.evaluate.metrics import generation_scores
from tunelab.inference import GenerationOptions, generate, load_run
from tunelab.testing.tiny import save_tiny_model_dir, tiny_llama, tiny_tokenizer
from tunelab.train.objectives import CausalLMObjective

CHATS = [
    {"messages": [{"role": "user", "content": "What is the capital of France?"},
                  {"role": "assistant", "content": "The capital of France is Paris."}]},
    {"messages": [{"role": "user", "content": "Who are you?"},
                  {"role": "assistant", "content": "I am Tuna, an assistant."},
                  {"role": "user", "content": "Write a short poem."},
                  {"role": "assistant", "content": "Waves fold silver into the shore."}]},
    {"messages": [{"role": "system", "content": "You are a helpful assistant."},
                  {"role": "user", "content": "1 + 2 = ?"}, {"role": "assistant", "content": "3"}]},
]
QUESTIONS = [  # question, A, B, C, D, answer
    ("What is 1 + 2?", "1", "2", "3", "4", "C"),
    ("The capital of France is", "Paris", "Lyon", "Nice", "Lille", "A"),
    ("Which animal jumps over the lazy dog?", "cat", "fox", "cow", "owl", "B"),
    ("What is 2 * 3?", "5", "8", "9", "6", "D"),
    ("Pick the colour of the sea.", "red", "blue", "green", "black", "B"),
    ("Who are you?", "Tuna", "Paris", "a fox", "a dog", "A"),
]
BASE_SUBJECT = "tiny_facts"


def _write_csv(path: Path, rows, header="question,A,B,C,D,answer"):
    lines = [header] if header else []
    lines += [",".join(f'"{cell}"' for cell in row) for row in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    """A base model dir, a LoRA run on it (adapter differs from the base), and data files."""
    from peft import LoraConfig, get_peft_model

    root = tmp_path_factory.mktemp("eval")
    base = save_tiny_model_dir(root / "base")
    run = root / "run"
    cfg = RunConfig(model=ModelConfig(name_or_path=str(base)), method=MethodConfig(type="lora"),
                    train=TrainConfig(precision="fp32", loss_chunk_size=16), output_dir=str(run))
    save_config(cfg, run / "config.yaml")
    tokenizer = tiny_tokenizer()
    tokenizer.save_pretrained(run)
    torch.manual_seed(1)
    peft_model = get_peft_model(tiny_llama(len(tokenizer)), LoraConfig(
        r=4, lora_alpha=16, target_modules=["q_proj", "v_proj", "o_proj", "down_proj"], init_lora_weights=False))
    peft_model.save_pretrained(run / "adapter")
    data = root / "data"
    data.mkdir()
    (data / "chats.jsonl").write_text("\n".join(json.dumps(c) for c in CHATS) + "\n", encoding="utf-8")
    (data / "wiki.txt").write_text("The quick brown fox jumps over the lazy dog.\n\nWaves fold silver.\n",
                                   encoding="utf-8")
    _write_csv(data / f"{BASE_SUBJECT}.csv", QUESTIONS)
    return {"root": root, "base": base, "run": run, "data": data}


@pytest.fixture
def fp32(monkeypatch):
    """Bare models get the default precision ('auto': bf16 autocast on CPUs with bf16 units); the
    comparisons with a bare base below are about weights, so run everything in fp32."""
    monkeypatch.setattr("tunelab.evaluate.forward.resolve_precision", lambda precision: "no")


def _eval(run, task, data, **kw):
    args = dict(compare_base=False, shots=0, max_samples=None, batch_size=2, max_new_tokens=4)
    args.update(kw)
    return eval_main(str(run), task, str(data), **args)


# ----------------------------------------------------------------------- perplexity

def test_perplexity_equals_the_trainer_objective_on_the_same_examples(dirs):
    result = _eval(dirs["run"], "perplexity", dirs["data"] / "chats.jsonl", batch_size=2)
    tuned = result["tuned"]
    assert tuned["perplexity"] == pytest.approx(math.exp(tuned["loss"]), rel=1e-9)

    # The trainer's way: build_data (its pipeline), one packed batch, the training objective.
    loaded = load_run(dirs["run"])
    cfg = loaded.cfg.model_copy(update={"data": DataConfig(train=[str(dirs["data"] / "chats.jsonl")])})
    examples = build_data(cfg, loaded.tokenizer).train
    batch = collate(examples, loaded.tokenizer.pad_token_id, packing=True)
    objective = CausalLMObjective(cfg.train.loss_chunk_size)
    with torch.no_grad():
        total, _ = objective.loss(loaded.model, batch)
    assert tuned["tokens"] == objective.count(batch)
    assert tuned["loss"] == pytest.approx(float(total) / objective.count(batch), rel=1e-5)

    # Only assistant answers (with their end-of-turn marker) are scored, every turn of them.
    answers = [m["content"] for c in CHATS for m in c["messages"] if m["role"] == "assistant"]
    expected = sum(len(loaded.tokenizer(a + "<|im_end|>", add_special_tokens=False)["input_ids"]) for a in answers)
    assert tuned["tokens"] == expected


def test_perplexity_on_text_scores_every_token(dirs):
    result = _eval(dirs["run"], "perplexity", dirs["data"] / "wiki.txt")
    tokenizer = tiny_tokenizer()
    documents = ["The quick brown fox jumps over the lazy dog.", "Waves fold silver."]
    # each document + eos; every token but the first is predicted
    assert result["tuned"]["tokens"] == sum(len(tokenizer(d)["input_ids"]) for d in documents)
    assert result["tuned"]["examples"] == 2


def test_compare_base_on_a_full_run_loads_the_base_again(dirs, tmp_path, monkeypatch, fp32):
    run = tmp_path / "full-run"
    cfg = RunConfig(model=ModelConfig(name_or_path=str(dirs["base"])), method=MethodConfig(type="full"),
                    train=TrainConfig(precision="fp32"), output_dir=str(run))
    save_config(cfg, run / "config.yaml")
    tiny_tokenizer().save_pretrained(run)
    tiny_llama(len(tiny_tokenizer()), seed=3).save_pretrained(run / "model")
    data = dirs["data"] / "chats.jsonl"
    result = _eval(run, "perplexity", data, compare_base=True)
    monkeypatch.chdir(tmp_path)
    bare = _eval(dirs["base"], "perplexity", data)
    assert result["base"]["loss"] == pytest.approx(bare["tuned"]["loss"], rel=1e-6)
    assert result["tuned"]["loss"] != pytest.approx(result["base"]["loss"], rel=1e-3)


# ----------------------------------------------------------------------- multiple choice

def _letter_scores(loaded, text, continuations):
    """log P(continuation | text) summed over its tokens, computed from full model logits."""
    tok = loaded.tokenizer
    prompt_ids = tok(text, add_special_tokens=False)["input_ids"]
    scores = []
    for continuation in continuations:
        ids = tok(text + continuation, add_special_tokens=False)["input_ids"]
        assert ids[:len(prompt_ids)] == prompt_ids
        with torch.no_grad():
            logits = loaded.model(input_ids=torch.tensor([ids])).logits[0].float().log_softmax(-1)
        scores.append(sum(float(logits[t - 1, ids[t]]) for t in range(len(prompt_ids), len(ids))))
    return scores


def _direct_scores(loaded, chat_format):
    """Per question, each option's full continuation log-likelihood, built without tunelab's prompt code."""
    header = f"The following are multiple choice questions (with answers) about {BASE_SUBJECT.replace('_', ' ')}.\n\n"
    scores = []
    for question, *options, _ in QUESTIONS:
        text = header + question + "\n" + "".join(f"{l}. {o}\n" for l, o in zip("ABCD", options)) + "Answer:"
        if chat_format:
            text = loaded.tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                                        add_generation_prompt=True)
        scores.append(_letter_scores(loaded, text, [("" if chat_format else " ") + l for l in "ABCD"]))
    return scores


@pytest.mark.parametrize("chat_format", [True, False])
def test_choice_accuracy_equals_a_direct_computation(dirs, chat_format):
    result = _eval(dirs["run"], "choice", dirs["data"] / f"{BASE_SUBJECT}.csv", chat_format=chat_format)
    direct = _direct_scores(load_run(dirs["run"]), chat_format)
    rows = [json.loads(line) for line in Path(result["files"]["predictions"]).read_text().splitlines()]
    for row, scores in zip(rows, direct):
        # One forward scores log P(letter | shared prefix): the full continuation log-likelihood up to a
        # constant shared by all options (the tiny tokenizer writes " A" as a space token + "A").
        got = [row["logprobs"][l] for l in "ABCD"]
        assert [g - got[0] for g in got] == pytest.approx([s - scores[0] for s in scores], abs=1e-4)
        if chat_format:
            assert got == pytest.approx(scores, abs=1e-4)
        assert row["prediction"] == "ABCD"[max(range(4), key=scores.__getitem__)]
    expected = 100.0 * sum(row["prediction"] == q[-1] for row, q in zip(rows, QUESTIONS)) / len(QUESTIONS)
    assert result["tuned"]["accuracy"] == pytest.approx(expected)
    assert result["tuned"]["subjects"] == {BASE_SUBJECT: {"accuracy": pytest.approx(expected), "questions": 6}}


def test_compare_base_reports_both_columns_and_base_equals_the_bare_base(dirs, tmp_path, monkeypatch, capsys,
                                                                         fp32):
    data = dirs["data"] / f"{BASE_SUBJECT}.csv"
    result = _eval(dirs["run"], "choice", data, compare_base=True)
    table = capsys.readouterr().out
    assert "base" in table and "tuned" in table and "delta" in table
    assert result["delta"]["accuracy"] == pytest.approx(result["tuned"]["accuracy"] - result["base"]["accuracy"])
    monkeypatch.chdir(tmp_path)
    bare = _eval(dirs["base"], "choice", data)
    assert result["base"] == bare["tuned"]
    base_rows = [json.loads(x) for x in Path(result["files"]["base_predictions"]).read_text().splitlines()]
    bare_rows = [json.loads(x) for x in Path(bare["files"]["predictions"]).read_text().splitlines()]
    tuned_rows = [json.loads(x) for x in Path(result["files"]["predictions"]).read_text().splitlines()]
    for base_row, bare_row, tuned_row in zip(base_rows, bare_rows, tuned_rows):
        assert base_row["logprobs"] == pytest.approx(bare_row["logprobs"], abs=1e-5)
        assert tuned_row["logprobs"] != pytest.approx(base_row["logprobs"], abs=1e-3)  # the adapter matters
    # the bare model's result lands in ./eval/, the run's in RUN/eval/<task>-<time>.json
    assert Path(bare["files"]["result"]).parent == Path("eval")
    saved = Path(result["files"]["result"])
    assert saved.parent == dirs["run"] / "eval" and saved.name.startswith("choice-")
    assert json.loads(saved.read_text())["base"] == result["base"]


def test_compare_base_needs_a_run(dirs, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match="bare model"):
        _eval(dirs["base"], "perplexity", dirs["data"] / "wiki.txt", compare_base=True)


@pytest.mark.parametrize("task, options, message", [
    ("bleu", {}, "not a task"),
    ("perplexity", {"shots": 2}, "--task choice only"),
    ("choice", {"max_samples": 0}, "--max-samples 0"),
    ("generation", {"batch_size": 0}, "--batch-size"),
])
def test_bad_options_are_refused_before_loading(dirs, task, options, message):
    with pytest.raises(ConfigError, match=message):
        _eval(dirs["run"], task, dirs["data"] / "chats.jsonl", **options)


def test_k_shot_prompts_hold_k_solved_examples_from_dev_or_first_rows(tmp_path):
    folder = tmp_path / "bench"
    folder.mkdir()
    _write_csv(folder / "algebra_dev.csv", [("Dev one?", "1", "2", "3", "4", "A"),
                                              ("Dev two?", "1", "2", "3", "4", "B"),
                                              ("Dev three?", "1", "2", "3", "4", "C")])
    _write_csv(folder / "algebra_val.csv", QUESTIONS[:3])
    _write_csv(folder / "algebra_test.csv", [q[:5] for q in QUESTIONS[:2]], header="question,A,B,C,D")  # C-Eval
    _write_csv(folder / "facts.csv", QUESTIONS)
    planned = plan_questions(load_choice_data(folder), shots=2)
    algebra = [p for p in planned if p.question.subject == "algebra"]
    facts = [p for p in planned if p.question.subject == "facts"]
    assert [p.question.question for p in algebra] == [q[0] for q in QUESTIONS[:3]]  # val scored, test skipped
    for item in algebra:
        assert item.prompt.count("\nAnswer: ") == 2 and item.prompt.endswith("\nAnswer:")
        assert "Dev one?\nA. 1\nB. 2\nC. 3\nD. 4\nAnswer: A\n\nDev two?" in item.prompt
        assert "Dev three?" not in item.prompt
    # no dev file: the first two rows become the examples and are not scored
    assert [p.question.question for p in facts] == [q[0] for q in QUESTIONS[2:]]
    assert "What is 1 + 2?\nA. 1\nB. 2\nC. 3\nD. 4\nAnswer: C" in facts[0].prompt
    assert plan_questions(load_choice_data(folder), shots=0, max_samples=1)[0].prompt.count("Answer") == 1
    with pytest.raises(ConfigError, match="only 3 few-shot examples"):
        plan_questions(load_choice_data(folder), shots=4)


@pytest.mark.parametrize("row, line, column", [
    ('"Q?","a","b","c","d","E"', 3, "answer"),
    ('"Q?","a","b"', 3, "C"),
    ('"","a","b","c","d","A"', 3, "question"),
])
def test_malformed_csv_row_names_file_line_and_column(dirs, tmp_path, row, line, column):
    path = tmp_path / "bad.csv"
    path.write_text('question,A,B,C,D,answer\n"Fine?","a","b","c","d","A"\n' + row + "\n", encoding="utf-8")
    with pytest.raises(DataError) as err:
        _eval(dirs["run"], "choice", path)  # fails before any model is loaded
    message = str(err.value)
    assert str(path) in message and f"line {line}" in message and f"'{column}'" in message


def test_headerless_mmlu_csv_and_subject_column(tmp_path):
    _write_csv(tmp_path / "anatomy_test.csv", QUESTIONS[:2], header=None)
    data = load_choice_data(tmp_path / "anatomy_test.csv")
    assert list(data.scored) == ["anatomy"] and data.scored["anatomy"][1].answer == "A"
    rows = [("law", *QUESTIONS[0]), ("math", *QUESTIONS[1])]
    _write_csv(tmp_path / "mixed.csv", rows, header="subject,question,A,B,C,D,answer")
    assert sorted(load_choice_data(tmp_path / "mixed.csv").scored) == ["law", "math"]


# ----------------------------------------------------------------------- generation

def test_generation_is_greedy_and_scored_against_references(dirs):
    data = dirs["data"] / "chats.jsonl"
    result = _eval(dirs["run"], "generation", data, max_new_tokens=5)
    rows = [json.loads(x) for x in Path(result["files"]["predictions"]).read_text().splitlines()]
    assert [row["reference"] for row in rows] == [c["messages"][-1]["content"] for c in CHATS]
    loaded = load_run(dirs["run"])
    prompts = [[Message(m["role"], m["content"]) for m in c["messages"][:-1]] for c in CHATS]
    greedy = generate(loaded, prompts, GenerationOptions(max_new_tokens=5, do_sample=False))
    assert [row["prediction"] for row in rows] == greedy
    expected = generation_scores(greedy, [row["reference"] for row in rows])
    assert {k: result["tuned"][k] for k in expected} == pytest.approx(expected)
    assert result["tuned"]["samples"] == 3
