"""Multiple-choice accuracy (MMLU, C-Eval, CMMLU style) by the log-likelihood of the answer.

The prompt is MMLU's (Hendrycks et al. 2021): a header naming the subject, ``k`` solved
examples, then the question with its options, ending in ``Answer:``. The model's choice is
the option whose answer continuation is most likely after that prompt.

Why one forward pass per question is exactly the standard scoring. Standard MMLU scoring
compares ``log P(continuation_i | prompt)`` over the options, i.e. the log-likelihood of
each complete token sequence ``prompt + continuation_i``. Here the continuation is the
option's letter (" A" after ``Answer:`` in plain text, "A" at the start of the assistant
turn in chat format). Tokenized, every ``prompt + continuation_i`` is a shared prefix ``s``
plus one token ``t_i`` of its own (checked for every question; often ``s`` is the prompt
and ``t_i`` the letter, but a tokenizer that writes the space as its own token just moves
it into ``s``). Then ``log P(prompt + continuation_i) = log P(s) + log P(t_i | s)``, where
``log P(s)`` is the same for every option, so the ranking -- and the accuracy -- depend only
on ``log P(t_i | s)``: the next-token log-probabilities of the letter tokens at the last
position of ``s``, all read from one forward pass. Only that position goes through the LM
head, so no ``length x vocabulary`` logits are built.

Chat format (``chat_format=True``, the default): the prompt is rendered through the run's
chat template as one user message with the generation prompt, because a tuned chat model
is used -- and should be measured -- in the format it was trained on. No special tokens are
added beyond what the template writes (like training and generation).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from tunelab.data.records import IGNORE_INDEX as IGNORE
from tunelab.data.records import Example, Message
from tunelab.errors import ConfigError
from tunelab.evaluate.choice_data import LETTERS, ChoiceData, Question
from tunelab.evaluate.forward import chunks, eval_autocast, padded_batch
from tunelab.evaluate.report import TaskResult
from tunelab.inference import LoadedRun
from tunelab.models.forward import hidden_states
from tunelab.progress import track

HEADER = "The following are multiple choice questions (with answers) about {subject}.\n\n"


@dataclass(frozen=True)
class PlannedQuestion:
    """A question to score and its k-shot prompt text (before any chat template)."""

    question: Question
    prompt: str


def format_question(question: Question, with_answer: bool) -> str:
    options = [f"{letter}. {text}" for letter, text in zip(LETTERS, question.options)]
    answer = f"Answer: {question.answer}" if with_answer else "Answer:"
    return "\n".join([question.question, *options, answer])


def build_prompt(question: Question, shots: Sequence[Question]) -> str:
    """MMLU prompt: header, solved examples separated by blank lines, the question ending in 'Answer:'."""
    examples = "".join(format_question(shot, with_answer=True) + "\n\n" for shot in shots)
    return HEADER.format(subject=question.subject.replace("_", " ")) + examples + format_question(question, False)


def _split_shots(subject: str, questions: list[Question], dev: list[Question], shots: int
                 ) -> tuple[list[Question], list[Question]]:
    """(few-shot examples, questions to score): from the dev pool, else the subject's first rows."""
    if shots == 0:
        return [], questions
    if dev:
        if len(dev) < shots:
            raise ConfigError(f"--shots {shots}: subject '{subject}' has only {len(dev)} few-shot examples in "
                              f"{dev[0].file}. Lower --shots or add dev rows.")
        return dev[:shots], questions
    if len(questions) <= shots:
        raise ConfigError(f"--shots {shots}: subject '{subject}' has {len(questions)} questions and no *_dev.csv "
                          f"file, so taking {shots} of them as examples leaves none to score. Lower --shots or "
                          "add a <subject>_dev.csv file with solved examples.")
    return questions[:shots], questions[shots:]


def plan_questions(data: ChoiceData, shots: int, max_samples: int | None = None) -> list[PlannedQuestion]:
    """Every question to score with its prompt; ``max_samples`` caps the questions per subject.

    Without a dev file the first ``shots`` questions of a subject become its examples and
    are not scored (a model must not be asked a question whose answer its prompt shows).
    """
    planned = []
    for subject, questions in data.scored.items():
        examples, to_score = _split_shots(subject, questions, data.dev.get(subject, []), shots)
        planned += [PlannedQuestion(q, build_prompt(q, examples)) for q in to_score[:max_samples]]
    return planned


def model_text(loaded: LoadedRun, prompt: str, chat_format: bool) -> str:
    """The text the model reads: the prompt itself, or a user turn of the chat template."""
    return loaded.render_prompt([Message("user", prompt)]) if chat_format else prompt


def answer_continuations(count: int, chat_format: bool) -> list[str]:
    """What follows the prompt for each option: " A" after 'Answer:' (as in the examples), "A" opening a turn."""
    return [("" if chat_format else " ") + letter for letter in LETTERS[:count]]


def letter_targets(tokenizer: Any, text: str, continuations: list[str]) -> tuple[list[int], list[int]]:
    """(shared prefix ids, one distinct token per option) of ``text + continuation`` (see module doc)."""
    encoded = tokenizer([text + c for c in continuations], add_special_tokens=False)["input_ids"]
    shared = 0
    while all(len(ids) > shared for ids in encoded) and len({ids[shared] for ids in encoded}) == 1:
        shared += 1
    targets = [ids[shared] if len(ids) == shared + 1 else None for ids in encoded]
    if shared == 0 or None in targets or len(set(targets)) != len(targets):
        raise ConfigError(f"the tokenizer does not write the answers {continuations} as one distinct token each "
                          "after a shared prefix, so they cannot be scored by next-token log-probabilities. Try "
                          "the other prompt format (chat_format).")
    return encoded[0][:shared], targets  # type: ignore[return-value]


@torch.no_grad()
def letter_logprobs(loaded: LoadedRun, contexts: list[list[int]], targets: list[list[int]], batch_size: int,
                    progress: str | None = None) -> list[list[float]]:
    """``log P(target | context)`` for each context's targets: one forward per context, batched.

    ``progress``: the label of a progress bar on the terminal (None: no bar).
    """
    order = sorted(range(len(contexts)), key=lambda i: len(contexts[i]))
    scores: dict[int, list[float]] = {}
    loaded.model.eval()
    with eval_autocast(loaded):
        for group in track(chunks(order, batch_size), progress, unit="question"):
            batch = padded_batch([Example(contexts[i], [IGNORE] * len(contexts[i])) for i in group], loaded)
            hidden, head = hidden_states(loaded.model, batch)
            last = torch.tensor([len(contexts[i]) - 1 for i in group], device=hidden.device)
            rows = hidden[torch.arange(len(group), device=hidden.device), last]
            logps = head(rows).float().log_softmax(dim=-1)
            for row, i in enumerate(group):
                scores[i] = logps[row, targets[i]].tolist()
    return [scores[i] for i in range(len(contexts))]


def _row(question: Question, logps: list[float]) -> dict[str, Any]:
    letters = LETTERS[:len(logps)]
    prediction = letters[max(range(len(logps)), key=logps.__getitem__)]
    return {"subject": question.subject, "file": question.file, "line": question.line, "answer": question.answer,
            "prediction": prediction, "correct": prediction == question.answer,
            "logprobs": dict(zip(letters, logps))}


def _accuracy(flags: list[bool]) -> dict[str, Any]:
    return {"accuracy": 100.0 * sum(flags) / len(flags), "questions": len(flags)}


def accuracy_report(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Overall accuracy over all questions (%), and accuracy per subject."""
    by_subject: dict[str, list[bool]] = defaultdict(list)
    for row in rows:
        by_subject[row["subject"]].append(row["correct"])
    return {**_accuracy([row["correct"] for row in rows]),
            "subjects": {subject: _accuracy(flags) for subject, flags in sorted(by_subject.items())}}


def choice_eval(loaded: LoadedRun, planned: list[PlannedQuestion], batch_size: int, chat_format: bool,
                progress: str | None = None) -> TaskResult:
    """Pick each question's most likely letter; accuracy overall and per subject, one row per question."""
    contexts, targets = [], []
    for item in planned:
        text = model_text(loaded, item.prompt, chat_format)
        context, letters = letter_targets(loaded.tokenizer, text,
                                          answer_continuations(len(item.question.options), chat_format))
        contexts.append(context)
        targets.append(letters)
    scores = letter_logprobs(loaded, contexts, targets, batch_size, progress)
    rows = [_row(item.question, logps) for item, logps in zip(planned, scores)]
    return TaskResult(accuracy_report(rows), rows)
