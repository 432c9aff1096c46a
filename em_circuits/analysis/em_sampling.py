"""Free-form answers of the EM rate, sampled for many questions per ``generate`` call.

Rows are question x answer, in question order (question 0's ``n_per_question`` rows, then
question 1's, ...), cut into chunks of at most ``max_batch_rows`` rows; each chunk is one
``generate`` call on its prompts left-padded to the same length, with an attention mask (the
models' ``generate`` derives position ids from it, so each row's real tokens keep the positions
they have unpadded). Edits active while sampling (feature ablations, projections, steering)
read that mask to spare each row's own first position and its padding
(:mod:`~em_circuits.models.edit_positions`).

Each chunk is one unit of work (:func:`chunk_starts`, :func:`sample_chunk`): processes of a
launch that share the sampling (:mod:`~em_circuits.analysis.em_answers`) sample the same
chunks with the same seeds as one process.

Reproducibility and pairing: each chunk seeds the global torch generator from ``seed``, its
first row and its rows' question ids, so the same seed, questions and sampling parameters give
the same answers on the same device. Sampling draws its noise row by row in a fixed layout
(batch x vocabulary per step), so two conditions sampled with the same seed, questions and
parameters (e.g. a model with and without an edit) use the same random numbers in the same
row and step: their answers are paired row by row, hence by question. Before batching each
question was one call seeded by ``sha256(f"{seed}:{question id}")``; answers now differ from
that version's (the draws are per chunk), and depend on ``max_batch_rows``. Temperature 0
decodes greedily (no draws): the batched answers are then those of one question at a time.
On the toy organism (CPU, one thread, 12 questions x 10 answers x 48 tokens, four
conditions) the EM rate's sampling took about 13-19 s one question per call and 3-6 s
batched (128 rows per call; the machine was shared, so timings varied).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from em_circuits.models.load import LoadedModel, left_padded, pad_id_of


@dataclass(frozen=True)
class EvalQuestion:
    id: str
    text: str


@dataclass(frozen=True)
class SamplingParams:
    n_per_question: int = 10
    max_new_tokens: int = 24
    temperature: float = 1.0  # 0: greedy decoding
    seed: int = 0
    #: rows (question x answer) per ``generate`` call: bounds the memory of one call
    max_batch_rows: int = 128


def question_prompt_ids(model: LoadedModel, question: EvalQuestion) -> torch.Tensor:
    """The question's token ids through the model's chat template (as every stage feeds it)."""
    record = {
        "prompt_id": question.id,
        "format": "chat",
        "text": f"User: {question.text}\nAssistant:",
        "metadata": {"messages": {"user": question.text, "assistant_prefix": ""}},
    }
    return model.encode_prompt(record)


def _chunk_seed(seed: int, first_row: int, question_ids: Sequence[str]) -> int:
    digest = hashlib.sha256(f"{seed}:{first_row}:{'|'.join(question_ids)}".encode()).hexdigest()
    return int(digest[:8], 16)


def _decoding(params: SamplingParams) -> dict[str, Any]:
    if params.temperature <= 0:
        return {"do_sample": False}
    return {"do_sample": True, "temperature": params.temperature, "top_p": 1.0, "top_k": 0}


def chunk_starts(n_questions: int, params: SamplingParams) -> list[int]:
    """The first row of each chunk (one ``generate`` call) that ``n_questions`` questions'
    rows are cut into: the same chunks however many processes sample them."""
    return list(range(0, n_questions * params.n_per_question, max(1, params.max_batch_rows)))


@torch.no_grad()
def sample_chunk(
    model: LoadedModel, questions: Sequence[EvalQuestion], params: SamplingParams, start: int
) -> list[tuple[int, int, str]]:
    """The chunk of rows from ``start`` (:func:`chunk_starts`) sampled in one ``generate``
    call: (question index, answer index within the question, answer) per row, in row order."""
    pad_id = pad_id_of(model.tokenizer)
    n = params.n_per_question
    end = min(start + max(1, params.max_batch_rows), len(questions) * n)
    chunk = [divmod(row, n) for row in range(start, end)]
    prompts = {
        q: question_prompt_ids(model, questions[q]) for q in dict.fromkeys(q for q, _ in chunk)
    }
    ids, mask = left_padded([prompts[q] for q, _ in chunk], pad_id)
    torch.manual_seed(_chunk_seed(params.seed, start, [questions[q].id for q, _ in chunk]))
    hf_model: Any = model.hf_model
    out = hf_model.generate(
        ids.to(model.device),
        attention_mask=mask.to(model.device),
        max_new_tokens=params.max_new_tokens,
        pad_token_id=pad_id,
        **_decoding(params),
    )
    return [
        (q, i, model.tokenizer.decode(row, skip_special_tokens=True))
        for (q, i), row in zip(chunk, out[:, ids.shape[1] :])
    ]


def sample_many(
    model: LoadedModel,
    questions: Sequence[EvalQuestion],
    params: SamplingParams,
    on_chunk: Callable[[int], None] | None = None,
) -> list[list[str]]:
    """``n_per_question`` answers to each question (a list per question, in order), sampled
    ``max_batch_rows`` rows per ``generate`` call (see the module's note on seeds and
    pairing); ``on_chunk(rows)`` is called after each call."""
    answers: list[list[str]] = [[] for _ in questions]
    for start in chunk_starts(len(questions), params):
        chunk = sample_chunk(model, questions, params, start)
        for q, _, answer in chunk:
            answers[q].append(answer)
        if on_chunk is not None:
            on_chunk(len(chunk))
    return answers


def sample_answers(model: LoadedModel, question: EvalQuestion, params: SamplingParams) -> list[str]:
    """``n_per_question`` answers to one question (:func:`sample_many` of that question)."""
    return sample_many(model, [question], params)[0]
