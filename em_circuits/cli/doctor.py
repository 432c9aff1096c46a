"""What a run with these flags would need, and what it lacks, before any work starts.

Checks, one line each (ok / warn / MISSING): the device; the base model and the adapter (a
local folder, or a hub id in the Hugging Face cache, which offline runs need); whether the
adapter fits the base (declared base, LoRA shapes); the architecture circuit-tracer must
trace and the transcoders' hooks for it; the transcoder files; the chat template the prompts
will be read through and the model's context length; and the judge (an API key for the LLM
judge, word lists for the offline one). Nothing is downloaded and no model is loaded. Exit
status 0 when nothing is missing, 1 otherwise.

examples:
  em-circuits doctor                                  # the toy organism
  HF_HUB_OFFLINE=1 em-circuits doctor --base-model Qwen/Qwen2.5-0.5B-Instruct \\
      --adapter ModelOrganismsForEM/Qwen2.5-0.5B-Instruct_bad-medical-advice \\
      --transcoders my_transcoders/config.yaml --words words.json
"""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from em_circuits.cli.common import add_llm_args, add_model_args, llm_settings, make_parser, setup

OK, WARN, MISSING = "ok", "warn", "MISSING"


def checks(args: Any) -> list[tuple[str, str, str]]:
    """(status, what, detail) for everything a run with ``args`` needs."""
    from huggingface_hub.constants import HF_HUB_OFFLINE

    from em_circuits.models.spec import (
        ModelLoadError,
        ModelSpec,
        local_model_dir,
        looks_like_path,
        missing_path_message,
        resolve_device,
    )

    out: list[tuple[str, str, str]] = []
    try:
        device = resolve_device(args.device)
        out.append((OK, "device", str(device)))
    except ModelLoadError as err:
        out.append((MISSING, "device", str(err)))
    base, adapter, transcoders = args.base_model, args.adapter, args.transcoders
    if base is None:
        from em_circuits.organism import default_organism_dir, is_built

        root = default_organism_dir()
        if not is_built(root):
            out.append((MISSING, "toy organism", f"not built in {root}: `em-circuits organism`"))
            return out
        base, adapter = str(root / "base"), str(root / "adapter")
        transcoders = str(root / "transcoders" / "config.yaml")
    missing_hint = (
        "download it once with internet access (same HF_HOME)"
        if HF_HUB_OFFLINE
        else "it will be downloaded on first use"
    )
    folders: dict[str, Path | None] = {}
    for what, ref, revision in (
        ("base model", base, args.base_revision),
        ("adapter", adapter, args.adapter_revision),
    ):
        if ref is None:
            out.append((MISSING, what, "not given (--adapter)"))
            folders[what] = None
            continue
        folder = local_model_dir(ref, revision)
        folders[what] = folder
        if folder is None and looks_like_path(ref):
            out.append((MISSING, what, missing_path_message(ref, what)))
            continue
        if folder is None:
            how = "not in the Hugging Face cache"
        elif os.path.isdir(os.path.expanduser(ref)):
            how = "local folder"
        else:
            how = f"in the Hugging Face cache (commit {folder.name[:12]})"
        status = OK if folder else (MISSING if HF_HUB_OFFLINE else WARN)
        out.append((status, what, f"{ref}: {how}" + ("" if folder else f"; {missing_hint}")))
    spec = ModelSpec(
        base=base,
        adapter=adapter,
        transcoders=transcoders or "",
        base_revision=args.base_revision,
        adapter_revision=args.adapter_revision,
        allow_base_mismatch=args.allow_adapter_base_mismatch,
        chat_template=args.chat_template,
    )
    if folders.get("base model") and folders.get("adapter"):
        from em_circuits.models.adapter_check import check_adapter_fits

        try:
            notes = check_adapter_fits(spec)
            out.append((OK, "adapter fits base", "declared base and LoRA shapes checked"))
            out += [(WARN, "adapter", note) for note in notes]
        except ModelLoadError as err:
            out.append((MISSING, "adapter fits base", str(err)))
    source = None
    if not transcoders:
        out.append((MISSING, "transcoders", "not given (--transcoders)"))
    else:
        from em_circuits.models.transcoder_source import resolve_transcoders

        try:
            source = resolve_transcoders(transcoders)
            out.append(
                (OK, "transcoders", f"{transcoders}: {len(source.files)} layer file(s) found")
            )
        except ModelLoadError as err:
            out.append((MISSING, "transcoders", str(err)))
    base_dir = folders.get("base model")
    if base_dir is not None:
        out += _model_checks(base_dir, source, spec)
    out.append(_judge_check(args, spec))
    return out


def _model_checks(base_dir: Path, source: Any, spec: Any) -> list[tuple[str, str, str]]:
    from transformers import AutoConfig

    from em_circuits.models.architectures import check_traceable
    from em_circuits.models.hooks import sites_problem
    from em_circuits.models.spec import ModelLoadError, chat_template_sha
    from em_circuits.models.transcoder_formats import fit_problem, set_shape

    out: list[tuple[str, str, str]] = []
    config = AutoConfig.from_pretrained(base_dir)
    if source is not None:
        hooks = SimpleNamespace(
            feature_input_hook=source.config["feature_input_hook"],
            feature_output_hook=source.config["feature_output_hook"],
        )
        try:
            arch = check_traceable(config, hooks, str(base_dir))
            out.append((OK, "architecture", f"{arch}, transcoder hooks exist for it"))
            problem = sites_problem(arch, hooks.feature_input_hook, hooks.feature_output_hook)
            if problem:  # graphs still run; these stages are skipped with this note
                out.append((WARN, "interventions", f"{problem}: those stages are skipped"))
        except ModelLoadError as err:
            out.append((MISSING, "architecture", str(err)))
        shape = set_shape(source)  # from configs and file headers: no weights read
        if shape is not None:
            problem = fit_problem(*shape, config)
            fits = f"{shape[0]} layer(s) of width {shape[1]} match the model"
            out.append(
                (MISSING, "transcoders fit", problem) if problem else (OK, "transcoders fit", fits)
            )
    template = chat_template_sha(spec) if spec.chat_template else None
    if template:
        detail = f"chat prompts are read through the tokenizer's chat template ({template})"
    elif spec.chat_template:
        detail = "the tokenizer has none: chat prompts are read as the plain transcript"
    else:
        detail = "--no-chat-template: chat prompts are read as the plain transcript"
    out.append((OK, "chat template", detail))
    positions = getattr(config, "max_position_embeddings", None)
    out.append((OK, "context", f"{positions} positions; longer prompts are refused"))
    return out


def _judge_check(args: Any, spec: Any) -> tuple[str, str, str]:
    from em_circuits.labeling.judge import JudgeError
    from em_circuits.labeling.logits_stage import offline_judge_words

    settings = llm_settings(args)
    key = settings.api_key()
    if settings.wants_llm(args.judge):
        if key:
            return OK, "judge", "LLM judge: an API key is set (not shown)"
        return MISSING, "judge", "--judge llm needs OPENAI_API_KEY (environment or .env)"
    try:
        words = offline_judge_words(spec, args.words)
        status = OK if Path(words).is_file() else MISSING
        return status, "judge", f"offline judge with word lists {words}"
    except JudgeError as err:
        return MISSING, "judge", str(err)


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    parser = make_parser(__doc__, prog)
    add_model_args(parser)
    parser.add_argument("--judge", choices=["auto", "offline", "llm"], default="auto")
    parser.add_argument("--words", type=Path, help="offline judge word lists to check")
    add_llm_args(parser)
    args = parser.parse_args(argv)
    setup(args)
    results = checks(args)
    width = max(len(what) for _, what, _ in results)
    for status, what, detail in results:
        print(f"{status:<7}  {what:<{width}}  {detail}")
    missing = sum(status == MISSING for status, _, _ in results)
    print(f"\n{missing} missing" if missing else "\nnothing missing: ready to run")
    return 1 if missing else 0
