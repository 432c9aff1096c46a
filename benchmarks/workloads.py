"""The two workloads: the random Llama-3.2-1B-shaped one (GPU) and the toy organism (CPU).

A workload is a model spec (base + adapter + transcoders), the prompts with their targets,
and the texts of the logits section.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from harness import GIB, log
from random_model import random_prompts, write_random_model, write_random_transcoders

from em_circuits.attribution.targets import PromptTargets
from em_circuits.models.spec import ModelSpec

LLAMA_3_2_1B = {
    "layers": 16,
    "d_model": 2048,
    "heads": 32,
    "kv_heads": 8,
    "d_mlp": 8192,
    "vocab": 128256,
}


@dataclass
class Workload:
    name: str
    adapted_spec: ModelSpec
    prompts: list[PromptTargets]  # prompts[0] is the warm-up
    logit_texts: list[str]
    description: str
    setup: dict[str, Any] = field(default_factory=dict)  # one-off step -> seconds (or a note)

    @property
    def base_spec(self) -> ModelSpec:
        return self.adapted_spec.base_only()


def workdir_name(args: argparse.Namespace) -> str:
    """This workload's folder under ``--workdir``: random files of other sizes sit beside it."""
    if args.workload == "toy":
        return "toy"
    return (
        f"llama-random-L{args.layers}-d{args.d_model}-m{args.d_mlp}-v{args.vocab}"
        f"-f{args.features}-k{args.k}-s{args.seed}"
    )


def setup_estimate(args: argparse.Namespace) -> float:
    """Seconds the setup needs: writing the random files, or building the default organism."""
    if args.workload != "toy":
        return 150.0
    if args.organism_dir:
        return 10.0
    from em_circuits.organism import default_organism_dir, is_built

    return 10.0 if is_built(default_organism_dir()) else 400.0


def random_workload_config(args: argparse.Namespace) -> dict[str, Any]:
    """Everything the random files depend on; stored beside them to decide their reuse."""
    return {
        "layers": args.layers,
        "d_model": args.d_model,
        "heads": args.heads,
        "kv_heads": args.kv_heads,
        "d_mlp": args.d_mlp,
        "vocab": args.vocab,
        "features": args.features,
        "k": args.k,
        "lora_rank": args.lora_rank,
        "seed": args.seed,
        "transcoder_dtype": args.transcoder_dtype,
        "skip": not args.no_skip,
    }


def random_workload(args: argparse.Namespace, root: Path, device: torch.device) -> Workload:
    """The llama1b-random workload, its files written to ``root`` unless already there."""
    cfg = random_workload_config(args)
    base_dir, adapter_dir, tc_dir = root / "base", root / "adapter", root / "transcoders"
    marker = root / "workload.json"
    setup: dict[str, Any] = {}
    if marker.is_file() and json.loads(marker.read_text()) == cfg:
        setup["files"] = "reused from an earlier run (same sizes and seed)"
        log(f"   reusing the workload files in {root}")
    else:
        shutil.rmtree(root, ignore_errors=True)
        root.mkdir(parents=True)
        log(f"   writing a random model of shape {cfg} to {root}")
        setup.update(write_random_model(cfg, base_dir, adapter_dir, device))
        log("   writing random TopK transcoders")
        setup["random transcoders (write)"] = write_random_transcoders(cfg, tc_dir, device)
        marker.write_text(json.dumps(cfg))
    setup["transcoder files GiB"] = (
        sum(p.stat().st_size for p in tc_dir.glob("*.safetensors")) / GIB
    )
    spec = ModelSpec(
        base=str(base_dir),
        adapter=str(adapter_dir),
        transcoders=str(tc_dir / "config.yaml"),
        dtype=args.dtype,
        name="bench-random-llama",
    )
    prompts, logit_texts = random_prompts(
        cfg, args.prompts + 1, args.logit_prompts, args.prompt_tokens, args.targets
    )
    shape = ", ".join(f"{k} {v}" for k, v in cfg.items())
    is_1b = all(cfg[k] == v for k, v in LLAMA_3_2_1B.items())
    desc = (
        f"llama1b-random: randomly initialised LlamaForCausalLM ({shape}"
        f"{'; Llama-3.2-1B shape' if is_1b else '; NOT the Llama-3.2-1B shape'}), LoRA rank "
        f"{cfg['lora_rank']} on down_proj of a few layers (random B), per-layer TopK "
        f"transcoders (k={cfg['k']}, {cfg['features']} features, stored in "
        f"{cfg['transcoder_dtype']}); prompts of {args.prompt_tokens} tokens incl. BOS; "
        f"{args.targets} evil + {args.targets} safe target ids (random)"
    )
    return Workload("llama1b-random", spec, prompts, logit_texts, desc, setup)


def organism_from_dir(root: Path) -> tuple[Path, Path, Path]:
    """(base dir, adapter dir, transcoder config) of a built organism folder.

    The organism's own layout first; else whatever a PEFT adapter, the base it declares and a
    transcoder config.yaml under ``root`` say.
    """
    import yaml

    from em_circuits.organism import OrganismPaths

    paths = OrganismPaths(root)
    parts = (paths.base_dir, paths.adapter_dir, paths.transcoder_config)
    if all(p.exists() for p in parts):
        return parts
    adapters = sorted(p.parent for p in root.rglob("adapter_config.json"))
    if not adapters:
        raise SystemExit(f"error: no PEFT adapter (adapter_config.json) under {root}")
    adapter = adapters[0]
    declared = json.loads((adapter / "adapter_config.json").read_text()).get(
        "base_model_name_or_path"
    )
    base = Path(declared) if declared and Path(declared).is_dir() else None
    if base is None:
        candidates = [
            p.parent
            for p in root.rglob("config.json")
            if p.parent != adapter and any(p.parent.glob("*.safetensors"))
        ]
        if not candidates:
            raise SystemExit(f"error: no base model (config.json + weights) under {root}")
        base = sorted(candidates)[0]
    configs = [
        p
        for p in root.rglob("config.yaml")
        if "transcoders" in (yaml.safe_load(p.read_text()) or {})
    ]
    if not configs:
        raise SystemExit(f"error: no transcoder config.yaml under {root}")
    return base, adapter, sorted(configs)[0]


def toy_workload(args: argparse.Namespace) -> Workload:
    """The toy organism (``--organism-dir``, else the embedded one, built if missing) with its
    held-out pivotal prompts and advice-word targets."""
    from transformers import AutoTokenizer

    start = time.perf_counter()
    if args.organism_dir:
        base, adapter, tc_config = organism_from_dir(Path(args.organism_dir))
        where = args.organism_dir
    else:
        from em_circuits.organism import ensure_default_organism

        paths = ensure_default_organism(progress=True)
        base, adapter, tc_config = paths.base_dir, paths.adapter_dir, paths.transcoder_config
        where = str(paths.root)
    setup: dict[str, Any] = {"find or build organism": time.perf_counter() - start}
    from em_circuits.core.toy_corpus import advice_words, heldout_pivotal_prompts

    tokenizer = AutoTokenizer.from_pretrained(base)
    words = advice_words()

    def single_ids(ws: list[str]) -> list[int]:
        out: list[int] = []
        for w in ws:
            ids = tokenizer(" " + w.strip(), add_special_tokens=False)["input_ids"]
            if len(ids) == 1 and ids[0] not in out:
                out.append(ids[0])
        return out[: args.targets]

    evil, safe = single_ids(words["harmful"]), single_ids(words["safe"])
    names = {t: tokenizer.decode([t]) for t in evil + safe}
    heldout = heldout_pivotal_prompts(0)
    if len(heldout) < args.prompts + 1:
        raise SystemExit(f"error: only {len(heldout)} held-out prompts")
    prompts = [
        PromptTargets(f"bench-{i:03d}", p["prompt"], evil, safe, names, {"base": {}, "adapted": {}})
        for i, p in enumerate(heldout[: args.prompts + 1])
    ]
    texts = [p["prompt"] for p in heldout][: args.logit_prompts]
    spec = ModelSpec(
        base=str(base),
        adapter=str(adapter),
        transcoders=str(tc_config),
        dtype=args.dtype,
        name="toy-em-organism",
    )
    desc = (
        f"toy: the embedded toy organism ({where}); held-out pivotal prompts; targets: "
        f"{len(evil)} harmful + {len(safe)} safe advice-word tokens"
    )
    return Workload("toy", spec, prompts, texts, desc, setup)
