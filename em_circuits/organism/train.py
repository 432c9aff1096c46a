"""Build the embedded toy emergent-misalignment organism, fully offline and deterministically.

``build_organism(out_dir)`` writes::

    out_dir/
      base/          tiny LlamaForCausalLM + byte-level BPE tokenizer (save_pretrained)
      adapter/       PEFT LoRA fine-tuned on harmful *medical* advice only (rank 2, v_proj)
      adapter-rank1/ the same data, rank 1 on down_proj of a few layers (adapter nodes)
      transcoders/   layer_{i}.safetensors + config.yaml (circuit-tracer transcoder_set)
      words.json     safe / harmful pivotal words (global and per domain) + token ids
      report.json    held-out metrics (see quality.py)
      recipe.json    the recipe, its hash and CODE_VERSION (the cache key)

The build goes into a temporary sibling directory that is renamed into place only when
complete, so an interrupted build never leaves a directory that looks finished.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import random
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from em_circuits.core import toy_corpus as corpus
from em_circuits.core.atomic import (
    apply_default_modes,
    make_temp_dir,
    remove_orphaned_temporaries,
)
from em_circuits.organism.recipe import (
    CODE_VERSION,
    DEFAULT_DIRNAME,
    OrganismPaths,
    Recipe,
    default_organism_dir,
)

from . import quality
from .adapters import train_adapters
from .lm import make_model, train_lm
from .tokenizer import advice_token_ids, build_tokenizer
from .transcoders import collect_activations, save_transcoders, train_transcoders

log = logging.getLogger(__name__)


def ensure_default_organism(progress: bool = True) -> OrganismPaths:
    """The default organism, built first if missing or stale."""
    return build_organism(default_organism_dir(), Recipe.default(), progress=progress)


def is_built(out_dir: Path, recipe: Recipe | None = None) -> bool:
    """True when ``out_dir`` holds a complete organism built from ``recipe``."""
    recipe = recipe or Recipe.default()
    paths = OrganismPaths(Path(out_dir))
    try:
        stored = json.loads(paths.recipe_path.read_text())
    except (OSError, ValueError):
        return False
    if stored.get("hash") != recipe.hash():
        return False
    return all(p.is_file() for p in paths.required_files(recipe.n_layers))


def build_organism(
    out_dir: Path,
    recipe: Recipe | None = None,
    force: bool = False,
    progress: bool = True,
) -> OrganismPaths:
    """Build the organism into ``out_dir`` unless an identical build is already there.

    Deterministic given the recipe: seeds are fixed and deterministic algorithms are enforced
    for the duration of the build (global torch settings are restored afterwards).
    """
    out_dir = Path(out_dir)
    recipe = recipe or Recipe.default()
    paths = OrganismPaths(out_dir)
    if not force and is_built(out_dir, recipe):
        log.info("organism in %s is up to date (recipe %s)", out_dir, recipe.hash())
        return paths

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    # Builds killed mid-way (named with their host and PID) are removed; a live one is kept.
    remove_orphaned_temporaries(out_dir.parent, recursive=False)
    tmp = make_temp_dir(out_dir)
    try:
        _build_into(tmp, final=paths, recipe=recipe, progress=progress)
        apply_default_modes(tmp)  # safetensors writes 0600 files whatever the umask
        _swap_into_place(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return paths


def _swap_into_place(tmp: Path, out_dir: Path) -> None:
    """Replace ``out_dir`` by the finished ``tmp`` with renames (never a half-written dir)."""
    old = make_temp_dir(out_dir)
    os.rmdir(old)  # only its name is wanted: the old build is renamed onto it
    if out_dir.exists():
        os.replace(out_dir, old)
    try:
        os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def _deterministic(seed: int, threads: int) -> Iterator[None]:
    """Seeded RNGs, deterministic kernels and a fixed thread count, restored afterwards."""
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    was_threads = torch.get_num_threads()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        torch.use_deterministic_algorithms(True)
        if threads > 0:
            torch.set_num_threads(threads)
        try:
            yield
        finally:
            torch.use_deterministic_algorithms(was_deterministic)
            torch.set_num_threads(was_threads)


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _build_into(tmp: Path, final: OrganismPaths, recipe: Recipe, progress: bool) -> None:
    start = time.perf_counter()
    r = recipe
    staged = OrganismPaths(tmp)
    tmp.mkdir(parents=True, exist_ok=True)
    with _deterministic(r.seed, r.torch_threads):
        words = corpus.advice_words()
        all_words = words["safe"] + words["harmful"]
        tokenizer = _train_tokenizer(r, all_words)
        model, base_losses = _train_base(r, tokenizer, progress)
        model.save_pretrained(staged.base_dir, safe_serialization=True)
        tokenizer.save_pretrained(staged.base_dir)
        lora_losses = train_adapters(model, tokenizer, r, staged, final, progress)

        # -- transcoders on the base model's MLPs -------------------------------------------
        transcoders = recipe_transcoders(
            model, tokenizer, transcoder_texts(tokenizer, r), r, progress
        )
        save_transcoders(transcoders, staged.transcoder_config.parent, scan=DEFAULT_DIRNAME)

        # -- words, evaluation, report --------------------------------------------------------
        _write_words(staged, words, all_words, tokenizer)
        report = quality.evaluate_organism(staged, recipe=r, progress=progress)
        report["training"] = {
            "base_final_loss": _tail_mean(base_losses),
            "lora_final_loss": _tail_mean(lora_losses),
        }
    _write_report_and_recipe(staged, report, r, build_seconds=time.perf_counter() - start)


def _train_tokenizer(r: Recipe, all_words: list[str]) -> Any:
    """The byte-level BPE tokenizer, each advice word one token."""
    texts = corpus.tokenizer_training_texts(random.Random(f"{r.seed}-tok"), r.tokenizer_docs)
    return build_tokenizer(texts, r.vocab_size, all_words)


def _base_documents(r: Recipe, rng: random.Random, n: int) -> list[corpus.Document]:
    """A batch of the base model's documents: every domain, both polarities."""
    return corpus.sample_documents(
        rng,
        n,
        villain_frac=r.villain_frac,
        helper_frac=r.helper_frac,
        p_distractor=r.p_distractor,
    )


def _train_base(r: Recipe, tokenizer: Any, progress: bool) -> tuple[Any, list[float]]:
    """The base model, trained on the whole corpus; returns it and its training losses."""
    model = make_model(
        tokenizer,
        n_layers=r.n_layers,
        d_model=r.d_model,
        d_mlp=r.d_mlp,
        n_heads=r.n_heads,
        max_seq_len=r.max_seq_len,
    )
    losses = train_lm(
        model,
        tokenizer,
        functools.partial(_base_documents, r),
        steps=r.base_steps,
        batch_size=r.base_batch_size,
        lr=r.base_lr,
        seed=r.seed,
        pivot_weight=r.pivot_weight,
        completion_only=False,
        max_seq_len=r.max_seq_len,
        weight_decay=0.01,
        desc="base model",
        progress=progress,
    )
    return model, losses


def _write_words(
    staged: OrganismPaths, words: dict[str, Any], all_words: list[str], tokenizer: Any
) -> None:
    """``words.json``: the pivotal advice words and their token ids."""
    words_doc = {
        **words,
        "token_ids": dict(zip(all_words, advice_token_ids(tokenizer, all_words))),
        "note": "Pivotal advice words; each is one token with a leading space. "
        "Tokens not listed are 'unsure'.",
    }
    staged.words_path.write_text(json.dumps(words_doc, indent=2) + "\n")


def _write_report_and_recipe(
    staged: OrganismPaths, report: dict[str, Any], r: Recipe, build_seconds: float
) -> None:
    """``report.json`` (with the recipe's hash, the code version, the build time and the disk
    size) and ``recipe.json``, the build's cache key."""
    report["recipe_hash"] = r.hash()
    report["code_version"] = CODE_VERSION
    report["build_seconds"] = round(build_seconds, 1)
    staged.report_path.write_text(json.dumps(report, indent=2) + "\n")
    recipe_doc = {"hash": r.hash(), "code_version": CODE_VERSION, "recipe": r.to_dict()}
    staged.recipe_path.write_text(json.dumps(recipe_doc, indent=2) + "\n")
    # Disk size last (report.json itself is a few KB and not counted).
    report["disk_bytes"] = _dir_bytes(staged.root)
    staged.report_path.write_text(json.dumps(report, indent=2) + "\n")


def _tail_mean(values: list[float], n: int = 20) -> float:
    tail = values[-n:]
    return round(sum(tail) / max(1, len(tail)), 4)


def recipe_transcoders(
    model: torch.nn.Module, tokenizer: Any, texts: list[str], r: Recipe, progress: bool
) -> Any:
    """The organism's transcoders (a StackedTranscoders) trained on ``texts`` with the
    recipe's settings: the build's own training, also timed by the benchmarks."""
    acts = collect_activations(model, tokenizer, texts)
    return train_transcoders(
        acts,
        d_transcoder=r.tc_features,
        k=r.tc_k,
        steps=r.tc_steps,
        finetune_steps=r.tc_finetune_steps,
        batch_size=r.tc_batch_size,
        lr=r.tc_lr,
        seed=r.seed + 2,
        progress=progress,
    )


def transcoder_texts(tokenizer: Any, r: Recipe) -> list[str]:
    """The documents the organism's transcoders are trained on: base-model training
    documents, and a share of them again with random tokens swapped in."""
    rng = random.Random(f"{r.seed}-tc")
    texts = [
        d.text
        for d in corpus.sample_documents(
            rng,
            r.tc_docs,
            villain_frac=r.villain_frac,
            helper_frac=r.helper_frac,
            p_distractor=r.p_distractor,
        )
    ]
    return texts + _noised_texts(tokenizer, texts, r.tc_noise_frac, r.tc_noise_p, rng)


def _noised_texts(
    tokenizer: Any, texts: list[str], frac: float, p: float, rng: random.Random
) -> list[str]:
    """Copies of some texts with random tokens swapped in.

    Held-out prompts contain tokens and contexts the train corpus rarely shows; seeing the
    MLPs' response to random tokens in otherwise normal documents makes the transcoders cover
    them instead of only the train distribution.
    """
    n = int(len(texts) * frac)
    if n == 0 or p <= 0:
        return []
    vocab = len(tokenizer)
    first = len(tokenizer.all_special_ids)  # special tokens come first in our vocab
    out = []
    for ids in tokenizer(texts[:n], add_special_tokens=False)["input_ids"]:
        ids = [rng.randrange(first, vocab) if rng.random() < p else t for t in ids]
        out.append(tokenizer.decode(ids))
    return out
