#!/usr/bin/env python
"""Benchmarks of the graph stage against raw circuit-tracer (issue 9), in one process.

Measures, on one workload and with warm-up first:

(a) our graph stage per prompt (base + adapted ``build_graph``: targets, logits, compact save;
    plus the per-prompt feature analysis) against two raw ``circuit_tracer.attribute()`` calls;
(b) the reload-the-models-per-prompt pattern against models loaded once;
(c) stored bytes per prompt (compact graphs) against dense ``Graph.to_pt`` files;
(d) per-graph feature analysis against ``circuit_tracer.graph.prune_graph`` on the same graph;
(e) batched next-token logits against a per-prompt loop;
then changes past circuit-tracer's defaults (bf16 attribution checked against float32, batch
size from measured memory, both models resident on one transcoder set), each with its predicted
and measured effect.

Workloads: ``llama1b-random`` (GPU; no downloads: a randomly initialised model of
Llama-3.2-1B's shape, a random LoRA adapter and random TopK transcoders, all written to
``--workdir``; sizes are flags so the same path runs tiny on a CPU) and ``toy`` (the embedded
toy organism, the CPU default). See benchmarks/README.md.

Output: a Markdown report on stdout, written to ``$OUT/RESULTS.md`` when OUT is set and to
``--output``; the raw numbers as JSON beside it (``results.json`` / ``--json``).
"""

from __future__ import annotations

import argparse
import gc
import importlib.metadata
import json
import logging
import math
import os
import platform
import shlex
import shutil
import statistics
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402
# ruff: noqa: E402

from em_circuits.attribution.attribute import attribute_prompt
from em_circuits.attribution.stage import build_graph, load_graph
from em_circuits.attribution.storage import (
    CompactGraph,
    compact_from_dense,
    load_compact,
    save_compact,
)
from em_circuits.attribution.targets import AttributionParams, GraphError, PromptTargets
from em_circuits.core.store import ResultsStore
from em_circuits.models.load import (
    LoadedModel,
    load_model,
    load_transcoder_set,
    merged_model_dir,
    release,
)
from em_circuits.models.merge import merge_adapter
from em_circuits.models.spec import ModelSpec, resolve_dtype

try:  # the per-prompt feature analysis of the pipeline
    from em_circuits.analysis.effects import prompt_effects

    ANALYSIS = "em_circuits.features.prompt_effects(graph, position='any')"
except ImportError:  # pragma: no cover - only while features.py does not exist yet
    prompt_effects = None
    ANALYSIS = (
        "STAND-IN (em_circuits.features not importable): rank features by |total effect| on "
        "the contrast target of the compact graph"
    )

GIB = float(1 << 30)
RESERVE_S = 10.0  # kept for writing the report
LLAMA_3_2_1B = {
    "layers": 16, "d_model": 2048, "heads": 32, "kv_heads": 8, "d_mlp": 8192, "vocab": 128256,
}
REFERENCE_H100 = {
    "attribute_s": 3.0, "attribute_peak_gib": 21.3, "dense_pt_mb": 283.0, "prune_graph_s": 3.9,
}


# -- small helpers ------------------------------------------------------------------------------
def log(message: str) -> None:
    print(message, flush=True)


def cuda() -> bool:
    return torch.cuda.is_available()


def sync() -> None:
    if cuda():
        torch.cuda.synchronize()


@dataclass
class Measured:
    """Wall time of one synchronised call and the GPU memory it used (None on CPU)."""

    seconds: float
    peak_gib: float | None = None  # peak allocated during the call, everything resident included
    working_gib: float | None = None  # that peak minus what was allocated before the call


_SECTION_PEAK = [0]  # bytes: the highest peak any measure() saw since the section started


def measure(fn: Callable[[], Any]) -> tuple[Any, Measured]:
    """Run ``fn`` synchronised; its time, and its peak memory (which resets the peak counter,
    so sections keep their own peak in ``_SECTION_PEAK``)."""
    sync()
    before = torch.cuda.memory_allocated() if cuda() else 0
    if cuda():
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    out = fn()
    sync()
    seconds = time.perf_counter() - start
    if not cuda():
        return out, Measured(seconds)
    peak = torch.cuda.max_memory_allocated()
    _SECTION_PEAK[0] = max(_SECTION_PEAK[0], peak)
    return out, Measured(seconds, peak / GIB, (peak - before) / GIB)


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values)) if values else math.nan


def free_memory() -> None:
    gc.collect()
    if cuda():
        torch.cuda.empty_cache()


def weights_gib(*modules: Any) -> float:
    """Bytes of the distinct parameters of the given modules (shared ones counted once)."""
    seen: set[int] = set()
    total = 0
    for module in modules:
        if module is None:
            continue
        for p in module.parameters():
            if p.device.type == "meta" or p.data_ptr() in seen:
                continue
            seen.add(p.data_ptr())
            total += p.numel() * p.element_size()
    return total / GIB


def model_weights_gib(model: LoadedModel) -> float:
    return weights_gib(model.hf_model, model.replacement.transcoders)


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    if len(x) < 3:
        return math.nan
    rx = torch.tensor(x, dtype=torch.float64).argsort().argsort().double()
    ry = torch.tensor(y, dtype=torch.float64).argsort().argsort().double()
    rx, ry = rx - rx.mean(), ry - ry.mean()
    denom = float(rx.norm() * ry.norm())
    return float((rx * ry).sum()) / denom if denom else math.nan


def analyse(graph: CompactGraph) -> Any:
    """The per-prompt feature analysis the pipeline runs on each stored graph."""
    if prompt_effects is not None:
        return prompt_effects(graph, position="any")
    row = graph.contrast_index() or 0
    values = graph.total[row, : graph.n_features]
    return graph.features[values.abs().argsort(descending=True)]


def contrast_effects(graph: CompactGraph) -> dict[tuple[int, int, int], float]:
    """(layer, position, feature) -> total effect on the contrast target (row 0 if none)."""
    row = graph.contrast_index()
    row = 0 if row is None else row
    values = graph.total[row, : graph.n_features].double().tolist()
    keys = [tuple(int(v) for v in f) for f in graph.features.tolist()]
    return dict(zip(keys, values))


def feature_agreement(ref: CompactGraph, other: CompactGraph, top: int) -> dict[str, Any]:
    """Top features by |total effect| on the contrast target: overlap and rank agreement."""
    a, b = contrast_effects(ref), contrast_effects(other)
    top_a = sorted(a, key=lambda k: -abs(a[k]))[:top]
    top_b = sorted(b, key=lambda k: -abs(b[k]))[:top]
    union = set(top_a) | set(top_b)
    both = sorted(k for k in union if k in a and k in b)
    row_a = ref.contrast_index() or 0
    row_b = other.contrast_index() or 0
    value_a, value_b = float(ref.target_values[row_a]), float(other.target_values[row_b])
    return {
        "top": top,
        "jaccard": len(set(top_a) & set(top_b)) / max(len(union), 1),
        "spearman_signed": spearman([a[k] for k in both], [b[k] for k in both]),
        "n_ranked": len(both),
        "top1_same": bool(top_a and top_b and top_a[0] == top_b[0]),
        "contrast_value_ref": value_a,
        "contrast_value_other": value_b,
        "contrast_value_rel_diff": abs(value_a - value_b) / max(abs(value_a), 1e-12),
    }


class Skip(Exception):
    """A section cannot run (a prerequisite is missing); it is marked, not failed."""


# -- workloads ----------------------------------------------------------------------------------
@dataclass
class Workload:
    name: str
    adapted_spec: ModelSpec
    prompts: list[PromptTargets]  # prompts[0] is the warm-up
    logit_texts: list[str]
    description: str
    setup: dict[str, Any] = field(default_factory=dict)

    @property
    def base_spec(self) -> ModelSpec:
        return self.adapted_spec.base_only()


def build_word_tokenizer(vocab_size: int):
    """A word-level tokenizer with one entry per vocabulary id: ``w<id>`` (ids 0-3 special).

    BOS must not be id 0: circuit-tracer picks the BOS it prepends with ``filter(None, ...)``.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<bos>", "<eos>", "<unk>"]
    vocab = {tok: i for i, tok in enumerate(specials)}
    vocab.update({f"w{i}": i for i in range(len(specials), vocab_size)})
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>",
        unk_token="<unk>",
    )


def random_workload_config(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "layers": args.layers, "d_model": args.d_model, "heads": args.heads,
        "kv_heads": args.kv_heads, "d_mlp": args.d_mlp, "vocab": args.vocab,
        "features": args.features, "k": args.k, "lora_rank": args.lora_rank,
        "seed": args.seed, "transcoder_dtype": args.transcoder_dtype, "skip": not args.no_skip,
    }


def _write_random_model(cfg: dict[str, Any], base_dir: Path, adapter_dir: Path,
                        device: torch.device) -> dict[str, float]:
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    times: dict[str, float] = {}
    config = LlamaConfig(
        vocab_size=cfg["vocab"], hidden_size=cfg["d_model"], intermediate_size=cfg["d_mlp"],
        num_hidden_layers=cfg["layers"], num_attention_heads=cfg["heads"],
        num_key_value_heads=cfg["kv_heads"], head_dim=cfg["d_model"] // cfg["heads"],
        max_position_embeddings=131072, rope_theta=500000.0,
        rope_scaling={"rope_type": "llama3", "factor": 32.0, "high_freq_factor": 4.0,
                      "low_freq_factor": 1.0, "original_max_position_embeddings": 8192},
        tie_word_embeddings=True, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    torch.manual_seed(cfg["seed"])
    start = time.perf_counter()
    with torch.device(device):
        model = LlamaForCausalLM(config)
    model = model.to(torch.bfloat16).eval()  # stored in bf16, like the real checkpoint
    sync()
    times["init base model on device"] = time.perf_counter() - start

    start = time.perf_counter()
    model.save_pretrained(base_dir)
    build_word_tokenizer(cfg["vocab"]).save_pretrained(base_dir)
    times["save base model + tokenizer"] = time.perf_counter() - start

    start = time.perf_counter()
    n = cfg["layers"]
    layers = sorted({n // 4, n // 2, (3 * n) // 4})
    lora = LoraConfig(r=cfg["lora_rank"], lora_alpha=2 * cfg["lora_rank"],
                      target_modules=["down_proj"], layers_to_transform=layers,
                      lora_dropout=0.0, bias="none", task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, lora)
    gen = torch.Generator(device="cpu").manual_seed(cfg["seed"] + 1)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:  # PEFT starts B at zero; a random B changes the model
                param.copy_(torch.randn(param.shape, generator=gen) * 0.3)
    peft_model.peft_config["default"].base_model_name_or_path = str(base_dir)
    peft_model.save_pretrained(adapter_dir)
    times["random LoRA adapter"] = time.perf_counter() - start
    del peft_model, model
    free_memory()
    return times


def _write_random_transcoders(cfg: dict[str, Any], out_dir: Path,
                              device: torch.device) -> float:
    """Per-layer TopK transcoders, written as circuit-tracer safetensors + config.yaml.

    Scales: pre-activations ~ N(0, 1) on the unit-RMS MLP input; decoder rows sized so a
    reconstruction from k active features has an RMS of about 0.5.
    """
    import yaml
    from safetensors.torch import save_file

    start = time.perf_counter()
    out_dir.mkdir(parents=True, exist_ok=True)
    d, n_feat, k = cfg["d_model"], cfg["features"], cfg["k"]
    dtype = getattr(torch, cfg["transcoder_dtype"])
    dec_std = 0.5 / (4.4 * math.sqrt(k))
    files = []
    for layer in range(cfg["layers"]):
        gen = torch.Generator(device=device).manual_seed(cfg["seed"] + 1000 + layer)

        def rand(shape: tuple[int, ...], std: float, gen: torch.Generator = gen) -> torch.Tensor:
            out = torch.randn(shape, generator=gen, device=device, dtype=torch.float32)
            return (out * std).to(dtype).cpu().contiguous()

        tensors = {
            "W_enc": rand((n_feat, d), 1 / math.sqrt(d)),
            "W_dec": rand((n_feat, d), dec_std),
            "b_enc": torch.zeros(n_feat, dtype=dtype),
            "b_dec": torch.zeros(d, dtype=dtype),
        }
        if cfg["skip"]:
            tensors["W_skip"] = rand((d, d), 0.1 / math.sqrt(d))
        name = f"layer_{layer}.safetensors"
        save_file(tensors, str(out_dir / name))
        files.append(name)
        del tensors
    config = {
        "model_kind": "transcoder_set",
        "feature_input_hook": "mlp.hook_in",
        "feature_output_hook": "mlp.hook_out",
        "activation": "topk",
        "k": k,
        "scan": "bench-random-topk",
        "transcoders": files,
    }
    (out_dir / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return time.perf_counter() - start


def random_prompts(cfg: dict[str, Any], n_prompts: int, n_logit: int, n_tokens: int,
                   n_targets: int) -> tuple[list[PromptTargets], list[str]]:
    """Prompts of ``n_tokens`` ids (BOS + random words) and random evil/safe target ids."""
    gen = torch.Generator().manual_seed(cfg["seed"] + 7)
    first = 4  # after the special tokens
    ids = (torch.randperm(cfg["vocab"] - first, generator=gen)[: 2 * n_targets] + first).tolist()
    evil, safe = sorted(ids[:n_targets]), sorted(ids[n_targets:])
    names = {t: f"w{t}" for t in evil + safe}

    def text() -> str:
        words = torch.randint(first, cfg["vocab"], (n_tokens - 1,), generator=gen).tolist()
        return " ".join(f"w{w}" for w in words)

    prompts = [
        PromptTargets(f"bench-{i:03d}", text(), evil, safe, names, {"base": {}, "adapted": {}})
        for i in range(n_prompts)
    ]
    return prompts, [text() for _ in range(n_logit)]


def random_workload(args: argparse.Namespace, root: Path, device: torch.device) -> Workload:
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
        setup.update(_write_random_model(cfg, base_dir, adapter_dir, device))
        log("   writing random TopK transcoders")
        setup["random transcoders (write)"] = _write_random_transcoders(cfg, tc_dir, device)
        marker.write_text(json.dumps(cfg))
    setup["transcoder files GiB"] = sum(
        p.stat().st_size for p in tc_dir.glob("*.safetensors")) / GIB
    spec = ModelSpec(base=str(base_dir), adapter=str(adapter_dir),
                     transcoders=str(tc_dir / "config.yaml"), dtype=args.dtype,
                     name="bench-random-llama")
    prompts, logit_texts = random_prompts(cfg, args.prompts + 1, args.logit_prompts,
                                          args.prompt_tokens, args.targets)
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


def _organism_from_dir(root: Path) -> tuple[Path, Path, Path]:
    """(base dir, adapter dir, transcoder config) of a built organism folder.

    The organism's own layout first; else whatever a PEFT adapter, the base it declares and a
    transcoder config.yaml under ``root`` say.
    """
    import yaml

    try:
        from em_circuits.organism import OrganismPaths

        paths = OrganismPaths(root)
        parts = (paths.base_dir, paths.adapter_dir, paths.transcoder_config)
        if all(p.exists() for p in parts):
            return parts
    except ImportError:
        pass
    adapters = sorted(p.parent for p in root.rglob("adapter_config.json"))
    if not adapters:
        raise SystemExit(f"error: no PEFT adapter (adapter_config.json) under {root}")
    adapter = adapters[0]
    declared = json.loads((adapter / "adapter_config.json").read_text()).get(
        "base_model_name_or_path")
    base = Path(declared) if declared and Path(declared).is_dir() else None
    if base is None:
        candidates = [p.parent for p in root.rglob("config.json")
                      if p.parent != adapter and any(p.parent.glob("*.safetensors"))]
        if not candidates:
            raise SystemExit(f"error: no base model (config.json + weights) under {root}")
        base = sorted(candidates)[0]
    configs = [p for p in root.rglob("config.yaml")
               if "transcoders" in (yaml.safe_load(p.read_text()) or {})]
    if not configs:
        raise SystemExit(f"error: no transcoder config.yaml under {root}")
    return base, adapter, sorted(configs)[0]


def toy_workload(args: argparse.Namespace) -> Workload:
    from transformers import AutoTokenizer

    start = time.perf_counter()
    if args.organism_dir:
        base, adapter, tc_config = _organism_from_dir(Path(args.organism_dir))
        where = args.organism_dir
    else:
        try:
            from em_circuits.organism import ensure_default_organism
        except ImportError as err:
            raise SystemExit(
                f"error: the toy organism is not available ({err}); build a micro one with "
                "build_organism(Path('/tmp/bench-micro'), Recipe.micro()) and pass "
                "--organism-dir /tmp/bench-micro"
            ) from err
        paths = ensure_default_organism(progress=True)
        base, adapter, tc_config = paths.base_dir, paths.adapter_dir, paths.transcoder_config
        where = str(paths.root)
    setup: dict[str, Any] = {"find or build organism": time.perf_counter() - start}
    from em_circuits.organism.corpus import advice_words, heldout_pivotal_prompts

    tokenizer = AutoTokenizer.from_pretrained(base)
    words = advice_words()

    def single_ids(ws: list[str]) -> list[int]:
        out = []
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
        PromptTargets(f"bench-{i:03d}", p["prompt"], evil, safe, names,
                      {"base": {}, "adapted": {}})
        for i, p in enumerate(heldout[: args.prompts + 1])
    ]
    texts = [p["prompt"] for p in heldout][: args.logit_prompts]
    spec = ModelSpec(base=str(base), adapter=str(adapter), transcoders=str(tc_config),
                     dtype=args.dtype, name="toy-em-organism")
    desc = (f"toy: the embedded toy organism ({where}); held-out pivotal prompts; targets: "
            f"{len(evil)} harmful + {len(safe)} safe advice-word tokens")
    return Workload("toy", spec, prompts, texts, desc, setup)


# -- the benchmark --------------------------------------------------------------------------------
class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.started = time.perf_counter()
        self.device = torch.device(args.device)
        self.params = AttributionParams(max_feature_nodes=args.max_feature_nodes,
                                        batch_size=args.batch_size, edge_keep=args.edge_keep)
        self.workdir = Path(args.workdir) / self._workdir_name()
        self.n: dict[str, Any] = {}  # every raw number; becomes results.json
        self.status: dict[str, dict[str, Any]] = {}
        self.workload: Workload | None = None
        self.store: ResultsStore | None = None
        self.models: dict[str, LoadedModel] = {}
        self.shared_transcoders: Any = None
        self.base_metas: dict[str, dict[str, Any]] = {}  # fp32 base graphs of (a), by prompt id
        gpu_like = args.workload == "llama1b-random" and self.device.type == "cuda"
        self.guess_graph_s = 5.0 if gpu_like else 2.0
        self.guess_load_s = 40.0 if gpu_like else 5.0

    def _workdir_name(self) -> str:
        a = self.args
        if a.workload == "toy":
            return "toy"
        return (f"llama-random-L{a.layers}-d{a.d_model}-m{a.d_mlp}-v{a.vocab}-f{a.features}"
                f"-k{a.k}-s{a.seed}")

    # budget ---------------------------------------------------------------------------------
    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def left(self) -> float:
        return self.args.max_seconds - self.elapsed() - RESERVE_S

    def graph_s(self) -> float:
        """Best current estimate of one graph's wall time (both model roles alike)."""
        return self.guess_graph_s

    def run(self, key: str, title: str, estimate: Callable[[], float],
            fn: Callable[[], None]) -> None:
        need = estimate()
        entry: dict[str, Any] = {"title": title, "estimate_s": round(need, 1)}
        self.status[key] = entry
        if key in self.args.skip:
            entry["status"] = "not run: --skip"
            log(f"\n== {title}: not run (--skip)")
            return
        if self.left() < need:
            entry["status"] = f"not run: budget ({self.left():.0f} s left, needs ~{need:.0f} s)"
            log(f"\n== {title}: {entry['status']}")
            return
        log(f"\n== [{self.elapsed():6.1f} s] {title} (budget left {self.left():.0f} s, "
            f"estimate {need:.0f} s)")
        if cuda():
            torch.cuda.reset_peak_memory_stats()
            _SECTION_PEAK[0] = torch.cuda.memory_allocated()
        start = time.perf_counter()
        try:
            fn()
            entry["status"] = "ok"
        except Skip as why:
            entry["status"] = f"not run: {why}"
        except Exception as err:  # one section's failure must not lose the others
            traceback.print_exc()
            entry["status"] = f"failed: {type(err).__name__}: {str(err)[:300]}"
        entry["seconds"] = round(time.perf_counter() - start, 2)
        if cuda():
            peak = max(_SECTION_PEAK[0], torch.cuda.max_memory_allocated())
            entry["section_peak_gib"] = round(peak / GIB, 2)
        log(f"   {entry['status']} after {entry['seconds']:.1f} s")

    def budget_allows(self, seconds: float, what: str, notes: list[str]) -> bool:
        if self.left() >= seconds:
            return True
        notes.append(f"{what}: stopped early, budget ({self.left():.0f} s left)")
        log(f"   {notes[-1]}")
        return False

    # sections -------------------------------------------------------------------------------
    def sec_setup(self) -> None:
        if self.args.fresh:
            shutil.rmtree(self.workdir, ignore_errors=True)
        self.workdir.mkdir(parents=True, exist_ok=True)
        if self.args.workload == "toy":
            workload = toy_workload(self.args)
        else:
            workload = random_workload(self.args, self.workdir / "files", self.device)
        self.store = ResultsStore(self.workdir / "results")
        # Import what loading needs now, so the timed first load pays no module imports.
        start = time.perf_counter()
        import circuit_tracer.replacement_model.replacement_model_nnsight  # noqa: F401
        import peft  # noqa: F401
        import transformers.models.llama.modeling_llama  # noqa: F401

        workload.setup["imports (circuit-tracer, nnsight, peft)"] = time.perf_counter() - start
        spec = workload.adapted_spec
        merged = merged_model_dir(spec, self.store.merged_cache_dir, self.device)
        if (merged / "merge_report.json").is_file():
            workload.setup["merge adapter"] = "cached"
        else:
            dtype = resolve_dtype(spec.dtype, self.device)
            _, m = measure(lambda: merge_adapter(spec, merged, dtype))
            workload.setup["merge adapter (once per adapter and dtype)"] = m.seconds
        self.workload = workload
        self.n["setup"] = workload.setup
        log(f"   {workload.description}")

    def _need_workload(self) -> Workload:
        if self.workload is None or self.store is None:
            raise Skip("setup did not complete")
        return self.workload

    def _need_models(self) -> tuple[LoadedModel, LoadedModel]:
        if "base" not in self.models or "adapted" not in self.models:
            raise Skip("the resident models are not loaded")
        return self.models["base"], self.models["adapted"]

    def sec_load(self) -> None:
        w = self._need_workload()
        assert self.store is not None
        spec = w.adapted_spec
        dtype = resolve_dtype(spec.dtype, self.device)
        shared, m_tc = measure(lambda: load_transcoder_set(spec.transcoders, self.device, dtype))
        self.shared_transcoders = shared
        out: dict[str, Any] = {"transcoders_s": m_tc.seconds}
        for role, s in (("base", w.base_spec), ("adapted", spec)):
            model, m = measure(lambda s=s: load_model(s, self.device, self.store.merged_cache_dir,
                                                      transcoder_set=shared))
            self.models[role] = model
            out[f"{role}_s"] = m.seconds
        base, adapted = self.models["base"], self.models["adapted"]
        out["total_s"] = out["transcoders_s"] + out["base_s"] + out["adapted_s"]
        out["transcoders_gib"] = weights_gib(shared)
        out["model_gib"] = weights_gib(base.hf_model)
        out["one_model_gib"] = model_weights_gib(base)
        out["both_resident_gib"] = weights_gib(base.hf_model, adapted.hf_model, shared)
        out["dtype"] = str(dtype).removeprefix("torch.")
        if adapted.merge_report is not None:
            out["adapter"] = adapted.merge_report.summary()
        self.n["load"] = out
        self.guess_load_s = max(out["transcoders_s"] + out["base_s"], 1.0)
        log(f"   transcoders {out['transcoders_s']:.1f} s, base {out['base_s']:.1f} s, adapted "
            f"{out['adapted_s']:.1f} s; weights resident {out['both_resident_gib']:.2f} GiB")

    def sec_logits(self) -> None:
        w = self._need_workload()
        _, adapted = self._need_models()
        from em_circuits.models.logits import next_token_logits

        texts = w.logit_texts
        bs = self.args.logit_batch
        next_token_logits(adapted, texts[: min(bs, len(texts))], batch_size=bs)  # warm-up
        next_token_logits(adapted, texts[:2], batch_size=1)
        batched, m_b = measure(lambda: next_token_logits(adapted, texts, batch_size=bs))
        looped, m_l = measure(lambda: next_token_logits(adapted, texts, batch_size=1))
        diff = float((batched - looped).abs().max())
        scale = float(looped.abs().max())
        self.n["e"] = {
            "n_prompts": len(texts), "batch_size": bs,
            "batched_s": m_b.seconds, "loop_s": m_l.seconds,
            "batched_prompts_per_s": len(texts) / m_b.seconds,
            "loop_prompts_per_s": len(texts) / m_l.seconds,
            "speedup": m_l.seconds / m_b.seconds,
            "max_abs_logit_diff": diff, "max_abs_logit": scale,
            "batched_peak_gib": m_b.peak_gib,
        }
        log(f"   batched {len(texts) / m_b.seconds:.1f} prompts/s, loop "
            f"{len(texts) / m_l.seconds:.1f} prompts/s, max |diff| {diff:.2e}")

    def _ours_prompt(self, pt: PromptTargets) -> dict[str, Any]:
        """Our graph stage for one prompt: both graphs built and saved, then analysed."""
        assert self.store is not None
        base, adapted = self._need_models()
        out: dict[str, Any] = {"build_s": {}, "attribute_s": {}, "analysis_s": {},
                               "build_working_gib": {}, "metas": {}}
        for role, model in (("base", base), ("adapted", adapted)):
            meta, m = measure(lambda model=model, role=role: build_graph(
                self.store, model, role, pt, self.params))
            out["build_s"][role] = m.seconds
            out["attribute_s"][role] = float(meta["seconds"])
            out["build_working_gib"][role] = m.working_gib
            out["metas"][role] = meta
        for role, meta in out["metas"].items():
            _, m = measure(lambda meta=meta: analyse(load_graph(self.store, meta)))
            out["analysis_s"][role] = m.seconds
        out["total_s"] = sum(out["build_s"].values()) + sum(out["analysis_s"].values())
        out["compact_bytes"] = sum(int(meta["files"]["compact_bytes"])
                                   for meta in out["metas"].values())
        assert self.store is not None
        out["meta_bytes"] = sum(
            (self.store.graph_dir(meta["model_slug"], pt.prompt_id)
             / f"{meta['params_key']}.json").stat().st_size for meta in out["metas"].values())
        return out

    def _raw_prompt(self, pt: PromptTargets) -> dict[str, Any]:
        """Two plain circuit-tracer attribute() calls with default (salient) targets, and two
        with our stage's targets."""
        from circuit_tracer import attribute

        from em_circuits.attribution.attribute import attribution_targets

        base, adapted = self._need_models()
        out: dict[str, Any] = {"attribute_s": {}, "peak_gib": {}, "working_gib": {},
                               "graphs": {}}
        out["same_targets_s"] = {}
        for role, model in (("base", base), ("adapted", adapted)):
            ids = model.encode(pt.text)
            graph, m = measure(lambda model=model, ids=ids: attribute(
                ids, model.replacement, batch_size=self.params.batch_size,
                max_feature_nodes=self.params.max_feature_nodes))
            out["attribute_s"][role] = m.seconds
            out["peak_gib"][role] = m.peak_gib
            out["working_gib"][role] = m.working_gib
            out["graphs"][role] = graph
            # The same call with exactly the targets our stage uses: which features get
            # attributed (and so the backward cost) depends on the targets, not on our code.
            _, custom = attribution_targets(model, pt, self.params, role, ids)
            _, m = measure(lambda model=model, ids=ids, custom=custom: attribute(
                ids, model.replacement, attribution_targets=custom,
                batch_size=self.params.batch_size,
                max_feature_nodes=self.params.max_feature_nodes))
            out["same_targets_s"][role] = m.seconds
        out["total_s"] = sum(out["attribute_s"].values())
        out["same_targets_total_s"] = sum(out["same_targets_s"].values())
        return out

    def sec_graph_stage(self) -> None:
        w = self._need_workload()
        self._need_models()
        notes: list[str] = []
        ours_runs: list[dict[str, Any]] = []
        raw_runs: list[dict[str, Any]] = []
        dense: dict[str, Any] = {}
        for i, pt in enumerate(w.prompts):
            if i > 1 and not self.budget_allows(
                    4.5 * self.graph_s() + 2, f"(a) after {i - 1} prompts", notes):
                break
            ours = self._ours_prompt(pt)
            raw = self._raw_prompt(pt)
            label = "warm-up" if i == 0 else f"prompt {i}"
            log(f"   {label}: ours {ours['total_s']:.2f} s (attribute() "
                f"{sum(ours['attribute_s'].values()):.2f} s), raw {raw['total_s']:.2f} s")
            if i == 0:  # not counted; its (slower) graph time sizes the budget checks
                self.guess_graph_s = median(list(ours["build_s"].values()))
                continue
            self.base_metas[pt.prompt_id] = ours["metas"]["base"]
            if not dense:
                dense = self._dense_sizes(raw["graphs"])
            raw.pop("graphs")
            ours.pop("metas")
            ours_runs.append(ours)
            raw_runs.append(raw)
            self.guess_graph_s = median([s for r in ours_runs for s in r["build_s"].values()])
        if not ours_runs:
            raise Skip("no prompt measured after the warm-up")
        ours_total = median([r["total_s"] for r in ours_runs])
        raw_total = median([r["total_s"] for r in raw_runs])
        ours_attr = median([sum(r["attribute_s"].values()) for r in ours_runs])
        ours_analysis = median([sum(r["analysis_s"].values()) for r in ours_runs])
        raw_graph = [s for r in raw_runs for s in r["attribute_s"].values()]
        raw_peak = [p for r in raw_runs for p in r["peak_gib"].values() if p is not None]
        raw_working = [p for r in raw_runs for p in r["working_gib"].values() if p is not None]
        ours_working = [p for r in ours_runs for p in r["build_working_gib"].values()
                        if p is not None]
        build = [s for r in ours_runs for s in r["build_s"].values()]
        self.n["a"] = {
            "n_prompts": len(ours_runs),
            "ours_per_prompt_s": ours_total,
            "ours_attribute_per_prompt_s": ours_attr,
            "ours_analysis_per_prompt_s": ours_analysis,
            "ours_extras_per_prompt_s": ours_total - ours_attr,
            "ours_build_median_s": median(build),
            "raw_per_prompt_s": raw_total,
            "raw_attribute_median_s": median(raw_graph),
            "ratio": ours_total / raw_total,
            "raw_same_targets_per_prompt_s": median([r["same_targets_total_s"] for r in raw_runs]),
            "ratio_same_targets": ours_total / median(
                [r["same_targets_total_s"] for r in raw_runs]),
            "raw_peak_gib_both_resident": max(raw_peak) if raw_peak else None,
            "raw_working_gib": max(raw_working) if raw_working else None,
            "ours_working_gib": max(ours_working) if ours_working else None,
            "prompts_per_hour": 3600.0 / ours_total,
            "per_prompt": {"ours": ours_runs, "raw": raw_runs},
            "notes": notes,
        }
        compact = median([r["compact_bytes"] for r in ours_runs])
        meta = median([r["meta_bytes"] for r in ours_runs])
        if dense:
            self.n["c"] = {
                "compact_bytes_per_prompt": compact, "meta_bytes_per_prompt": meta,
                **dense, "ratio": dense["dense_bytes_per_prompt"] / (compact + meta),
            }
        same = self.n["a"]["raw_same_targets_per_prompt_s"]
        log(f"   ours {ours_total:.2f} s/prompt vs raw {raw_total:.2f} s/prompt: ratio "
            f"{ours_total / raw_total:.3f}; vs raw with our targets {same:.2f} s: ratio "
            f"{ours_total / same:.3f}")

    def _dense_sizes(self, graphs: dict[str, Any]) -> dict[str, Any]:
        """Bytes (and save time) of circuit-tracer's dense .pt files of one prompt's graphs."""
        folder = self.workdir / "dense"
        folder.mkdir(parents=True, exist_ok=True)
        sizes, seconds = {}, {}
        for role, graph in graphs.items():
            path = folder / f"{role}.pt"
            _, m = measure(lambda graph=graph, path=path: graph.to_pt(str(path)))
            sizes[role] = path.stat().st_size
            seconds[role] = m.seconds
            path.unlink()
        n_nodes = {role: int(g.adjacency_matrix.shape[0]) for role, g in graphs.items()}
        return {"dense_bytes_per_prompt": sum(sizes.values()), "dense_bytes": sizes,
                "dense_save_s": seconds, "dense_nodes": n_nodes}

    def sec_analysis(self) -> None:
        w = self._need_workload()
        base, _ = self._need_models()
        from circuit_tracer.graph import prune_graph

        rows: list[dict[str, Any]] = []
        notes: list[str] = []
        path = self.workdir / "analysis-probe.safetensors"
        for pt in w.prompts[1: 1 + self.args.analysis_graphs]:
            if rows and not self.budget_allows(2 * self.graph_s() + 10, "(d)", notes):
                break
            (compact, graph, info), _ = measure(
                lambda pt=pt: attribute_prompt(base, pt, self.params))
            _, m_total = measure(lambda info=info: compact_from_dense(
                info["dense"], self.params.edge_keep, device=base.device))
            save_compact(compact, path)
            _, m_an = measure(lambda: analyse(load_compact(path)))
            _, m_prune = measure(lambda graph=graph: prune_graph(graph))
            row = {"total_effects_s": m_total.seconds, "analysis_s": m_an.seconds,
                   "prune_graph_s": m_prune.seconds,
                   "adjacency_device": str(graph.adjacency_matrix.device),
                   "n_nodes": int(graph.adjacency_matrix.shape[0])}
            if cuda() and graph.adjacency_matrix.device.type == "cpu":
                graph.to(self.device)
                prune_graph(graph)  # warm the GPU kernels
                _, m_gpu = measure(lambda graph=graph: prune_graph(graph))
                row["prune_graph_gpu_s"] = m_gpu.seconds
            rows.append(row)
            log(f"   prune_graph {m_prune.seconds:.3f} s; ours: analysis {m_an.seconds:.3f} s, "
                f"total effects at graph time {m_total.seconds:.3f} s")
            del graph, compact
            free_memory()
        path.unlink(missing_ok=True)
        if not rows:
            raise Skip("no graph analysed")
        analysis = median([r["analysis_s"] for r in rows])
        total = median([r["total_effects_s"] for r in rows])
        prune = median([r["prune_graph_s"] for r in rows])
        gpu = [r["prune_graph_gpu_s"] for r in rows if "prune_graph_gpu_s" in r]
        self.n["d"] = {
            "n_graphs": len(rows), "analysis_s": analysis, "total_effects_s": total,
            "prune_graph_s": prune, "prune_graph_gpu_s": median(gpu) if gpu else None,
            "ratio_analysis": prune / analysis,
            "ratio_with_total_effects": prune / (analysis + total),
            "analysis": ANALYSIS, "rows": rows, "notes": notes,
        }

    def release_resident(self) -> None:
        for role in list(self.models):
            release(self.models.pop(role))
        self.shared_transcoders = None
        free_memory()

    def sec_reload(self) -> None:
        w = self._need_workload()
        assert self.store is not None
        self.release_resident()
        notes: list[str] = []
        runs: list[dict[str, Any]] = []
        for pt in w.prompts[1: 1 + self.args.reload_prompts]:
            need = 2 * (self.guess_load_s + self.graph_s()) + 5
            if runs and not self.budget_allows(need, "(b)", notes):
                break
            run: dict[str, Any] = {"load_s": {}, "build_s": {}, "release_s": {},
                                   "analysis_s": {}, "peak_gib": {}}
            metas = {}
            for role, spec in (("base", w.base_spec), ("adapted", w.adapted_spec)):
                model, m_load = measure(lambda spec=spec: load_model(
                    spec, self.device, self.store.merged_cache_dir))
                meta, m_build = measure(lambda model=model, role=role, pt=pt: build_graph(
                    self.store, model, role, pt, self.params))
                _, m_rel = measure(lambda model=model: release(model))
                del model
                run["load_s"][role] = m_load.seconds
                run["build_s"][role] = m_build.seconds
                run["release_s"][role] = m_rel.seconds
                run["peak_gib"][role] = max(v for v in (m_load.peak_gib, m_build.peak_gib)
                                            if v is not None) if cuda() else None
                metas[role] = meta
            for role, meta in metas.items():
                _, m = measure(lambda meta=meta: analyse(load_graph(self.store, meta)))
                run["analysis_s"][role] = m.seconds
            run["total_s"] = sum(sum(run[k].values()) for k in
                                 ("load_s", "build_s", "release_s", "analysis_s"))
            runs.append(run)
            self.guess_load_s = max(run["load_s"].values())
            log(f"   {pt.prompt_id}: {run['total_s']:.2f} s (loads "
                f"{sum(run['load_s'].values()):.2f} s)")
        if not runs:
            raise Skip("no prompt measured")
        reload = median([r["total_s"] for r in runs])
        load_pair = median([sum(r["load_s"].values()) for r in runs])
        out: dict[str, Any] = {"n_prompts": len(runs), "reload_per_prompt_s": reload,
                               "load_pair_s": load_pair, "runs": runs, "notes": notes}
        a, load = self.n.get("a"), self.n.get("load")
        if a and load:
            n_run = len(w.prompts)
            out["by_n"] = {}
            for n in sorted({n_run, 100}):
                ours = a["ours_per_prompt_s"] + load["total_s"] / n
                out["by_n"][str(n)] = {"ours_per_prompt_s": ours, "speedup": reload / ours}
            out["speedup_steady"] = reload / a["ours_per_prompt_s"]
            out["n_run"] = n_run
        self.n["b"] = out

    def sec_fast_dtype(self) -> None:
        """bf16 (or --fast-dtype) attribution vs the float32 graphs of (a); batch-size sweep."""
        w = self._need_workload()
        assert self.store is not None
        if not self.base_metas:
            raise Skip("needs the reference graphs of (a)")
        self.release_resident()
        fast = self.args.fast_dtype
        spec = replace(w.base_spec, dtype=fast)
        model, m_load = measure(lambda: load_model(spec, self.device,
                                                   self.store.merged_cache_dir))
        notes: list[str] = []
        try:
            out: dict[str, Any] = {"dtype": fast, "load_s": m_load.seconds,
                                   "one_model_gib": model_weights_gib(model), "prompts": []}
            ref_time = self._fp32_attribute_times()
            pids = list(self.base_metas)[: self.args.dtype_prompts]
            by_id = {pt.prompt_id: pt for pt in w.prompts}
            attribute_prompt(model, by_id[pids[0]], self.params)  # warm-up
            for pid in pids:
                if out["prompts"] and not self.budget_allows(2 * self.graph_s(), "bf16", notes):
                    break
                (compact, _graph, info), m = measure(
                    lambda pid=pid: attribute_prompt(model, by_id[pid], self.params))
                ref = load_graph(self.store, self.base_metas[pid])
                agree = feature_agreement(ref, compact, self.args.top_features)
                out["prompts"].append({
                    "prompt_id": pid, "attribute_s": info["seconds"], "call_s": m.seconds,
                    "ref_attribute_s": ref_time.get(pid), "working_gib": m.working_gib,
                    **agree})
                log(f"   {pid}: {fast} attribute() {info['seconds']:.2f} s vs float32 "
                    f"{ref_time.get(pid, math.nan):.2f} s; top-{agree['top']} Jaccard "
                    f"{agree['jaccard']:.2f}, Spearman {agree['spearman_signed']:.3f}")
                del _graph
            rows = out["prompts"]
            if rows:
                out["attribute_s"] = median([r["attribute_s"] for r in rows])
                refs = [r["ref_attribute_s"] for r in rows if r["ref_attribute_s"] is not None]
                out["ref_attribute_s"] = median(refs)
                out["speedup"] = out["ref_attribute_s"] / out["attribute_s"]
                out["jaccard_min"] = min(r["jaccard"] for r in rows)
                out["jaccard_median"] = median([r["jaccard"] for r in rows])
                out["spearman_median"] = median([r["spearman_signed"] for r in rows])
                out["working_gib"] = max((r["working_gib"] for r in rows
                                          if r["working_gib"] is not None), default=None)
            self.n["fast_dtype"] = out
            self._batch_sweep(model, w, notes)
        finally:
            release(model)
            free_memory()
            self.n.setdefault("fast_dtype", {})["notes"] = notes

    def _fp32_attribute_times(self) -> dict[str, float]:
        times = {}
        for pid, meta in self.base_metas.items():
            times[pid] = float(meta["seconds"])
        return times

    def _batch_sweep(self, model: LoadedModel, w: Workload, notes: list[str]) -> None:
        sweep: dict[str, Any] = {"dtype": str(model.dtype).removeprefix("torch."), "rows": []}
        self.n["batch"] = sweep
        prompts = w.prompts[1: 1 + self.args.sweep_prompts]
        for bs in self.args.batch_sizes:
            need = (len(prompts) + 1) * self.graph_s() + 5
            if not self.budget_allows(need, f"batch {bs}", notes):
                break
            params = replace(self.params, batch_size=bs)
            row: dict[str, Any] = {"batch_size": bs, "attribute_s": [], "peak_gib": [],
                                   "working_gib": []}
            try:
                attribute_prompt(model, prompts[0], params)  # warm-up at this size
                for pt in prompts:
                    (_c, _g, info), m = measure(
                        lambda pt=pt, params=params: attribute_prompt(model, pt, params))
                    row["attribute_s"].append(info["seconds"])
                    row["peak_gib"].append(m.peak_gib)
                    row["working_gib"].append(m.working_gib)
                    del _g
                row["median_s"] = median(row["attribute_s"])
                row["max_peak_gib"] = (max(row["peak_gib"]) if cuda() else None)
                row["max_working_gib"] = (max(row["working_gib"]) if cuda() else None)
            except (GraphError, torch.cuda.OutOfMemoryError) as err:
                row["error"] = f"{type(err).__name__}: {str(err)[:200]}"
            free_memory()
            sweep["rows"].append(row)
            log(f"   batch {bs}: " + (row.get("error") or
                f"{row['median_s']:.2f} s/graph, peak {row['max_peak_gib']} GiB"))
        ok = [r for r in sweep["rows"] if "median_s" in r]
        if ok:
            limit = (0.8 * torch.cuda.get_device_properties(0).total_memory / GIB
                     if cuda() else math.inf)
            fitting = [r for r in ok if (r["max_peak_gib"] or 0) <= limit] or ok
            best = min(fitting, key=lambda r: r["median_s"])
            sweep["best_batch_size"] = best["batch_size"]
            sweep["best_s"] = best["median_s"]
            sweep["memory_limit_gib"] = None if limit == math.inf else limit

    # report -----------------------------------------------------------------------------------
    def environment(self) -> dict[str, Any]:
        def version(name: str) -> str:
            try:
                return importlib.metadata.version(name)
            except importlib.metadata.PackageNotFoundError:
                return "not installed"

        env = {
            "device": (torch.cuda.get_device_name(0) if cuda()
                       else f"cpu ({platform.processor() or platform.machine()}, "
                            f"{torch.get_num_threads()} threads)"),
            "gpu_memory_gib": (torch.cuda.get_device_properties(0).total_memory / GIB
                               if cuda() else None),
            "cuda": torch.version.cuda,
            "python": platform.python_version(),
            "versions": {n: version(n) for n in ("torch", "circuit-tracer", "nnsight",
                                                 "transformers", "peft", "safetensors")},
            "command": " ".join(shlex.quote(a) for a in sys.argv),
            "date_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
        }
        return env


# -- Markdown ----------------------------------------------------------------------------------
def fmt(value: Any, digits: int = 2, unit: str = "") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"  # no unit: "n/a GiB" reads as if a number were missing
    if isinstance(value, float):
        text = f"{value:.{digits}f}" if abs(value) < 1e5 else f"{value:.3g}"
    else:
        text = str(value)
    return f"{text} {unit}".rstrip()


def gib(value: float | None) -> str:
    return fmt(value, unit="GiB")


def mb(n_bytes: float | None) -> str:
    return "n/a" if n_bytes is None else f"{n_bytes / 1e6:.2f} MB"


def goal(met: bool | None) -> str:
    return "n/a" if met is None else ("**yes**" if met else "**no**")


def render(bench: Bench, env: dict[str, Any]) -> str:
    n, args = bench.n, bench.args
    w = bench.workload
    p = bench.params
    hw = "GPU" if cuda() else "CPU"
    lines = [
        f"## Graph-stage benchmarks: {w.name if w else args.workload} on {env['device']}",
        "",
        f"- Date (UTC): {env['date_utc']}; total wall time {bench.elapsed():.0f} s "
        f"(budget --max-seconds {args.max_seconds:.0f}).",
        f"- Software: Python {env['python']}, "
        + ", ".join(f"{k} {v}" for k, v in env["versions"].items())
        + (f", CUDA {env['cuda']}" if env["cuda"] else "")
        + (f"; GPU memory {env['gpu_memory_gib']:.1f} GiB" if env["gpu_memory_gib"] else ""),
        f"- Workload: {w.description if w else args.workload + ' (setup failed)'}.",
        f"- Attribution: max_feature_nodes {p.max_feature_nodes}, batch_size {p.batch_size}, "
        f"main dtype {args.dtype}, fast dtype {args.fast_dtype}; feature analysis: {ANALYSIS}.",
        f"- Command: `{env['command']}`",
        "",
        "### Headline ratios",
        "",
        "| | measurement | ours | reference | ratio | goal | met |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    a, b, c, d, e = (n.get(k) for k in ("a", "b", "c", "d", "e"))
    if a:
        lines.append(
            f"| (a) | graph stage per prompt, both models (build_graph x2: targets, logits, "
            f"compact save; + analysis x2) vs 2 raw `attribute()` | "
            f"{fmt(a['ours_per_prompt_s'])} s (attribute() {fmt(a['ours_attribute_per_prompt_s'])}"
            f" s, extras {fmt(a['ours_extras_per_prompt_s'])} s) | "
            f"{fmt(a['raw_per_prompt_s'])} s | {fmt(a['ratio'], 3)} | <= 1.1 | "
            f"{goal(a['ratio'] <= 1.1)} |")
        lines.append(
            f"| (a') | the same, against 2 raw `attribute()` given the same targets as ours "
            f"(contrast + labeled tokens): our code's own overhead | "
            f"{fmt(a['ours_per_prompt_s'])} s | {fmt(a['raw_same_targets_per_prompt_s'])} s | "
            f"{fmt(a['ratio_same_targets'], 3)} | <= 1.1 | {goal(a['ratio_same_targets'] <= 1.1)}"
            f" |")
    else:
        lines.append(f"| (a) | graph stage vs raw attribute() | {status(bench, 'a')} | | | "
                     "<= 1.1 | n/a |")
    if b and "by_n" in b:
        for key, row in b["by_n"].items():
            lines.append(
                f"| (b) | reload-per-prompt pattern vs models loaded once, N = {key} prompts "
                f"(load amortised) | {fmt(row['ours_per_prompt_s'])} s/prompt | "
                f"{fmt(b['reload_per_prompt_s'])} s/prompt (loads {fmt(b['load_pair_s'])} s) | "
                f"{fmt(row['speedup'], 1)}x | >= 5x | {goal(row['speedup'] >= 5)} |")
    else:
        lines.append(f"| (b) | reload-per-prompt pattern | {status(bench, 'b')} | | | >= 5x | "
                     "n/a |")
    if c:
        lines.append(
            f"| (c) | stored bytes per prompt, both models (compact safetensors + meta JSON) vs "
            f"dense `Graph.to_pt` | {mb(c['compact_bytes_per_prompt'])} + "
            f"{mb(c['meta_bytes_per_prompt'])} | {mb(c['dense_bytes_per_prompt'])} | "
            f"{fmt(c['ratio'], 0)}x | >= 50x | {goal(c['ratio'] >= 50)} |")
    else:
        lines.append(f"| (c) | stored bytes | {status(bench, 'a')} | | | >= 50x | n/a |")
    if d:
        lines.append(
            f"| (d) | feature analysis per graph vs `prune_graph` (same graph) | "
            f"{fmt(d['analysis_s'], 3)} s (+ total effects at graph time "
            f"{fmt(d['total_effects_s'], 3)} s) | {fmt(d['prune_graph_s'], 3)} s "
            f"(on {d['rows'][0]['adjacency_device']}"
            + (f"; on GPU {fmt(d['prune_graph_gpu_s'], 3)} s" if d["prune_graph_gpu_s"] else "")
            + f") | {fmt(d['ratio_analysis'], 1)}x ({fmt(d['ratio_with_total_effects'], 1)}"
            f"x incl. total effects) | > 1x | {goal(d['ratio_with_total_effects'] > 1)} |")
    else:
        lines.append(f"| (d) | analysis vs prune_graph | {status(bench, 'd')} | | | | n/a |")
    if e:
        lines.append(
            f"| (e) | next-token logits, {e['n_prompts']} prompts: batched (batch "
            f"{e['batch_size']}) vs per-prompt loop | {fmt(e['batched_prompts_per_s'], 1)} "
            f"prompts/s | {fmt(e['loop_prompts_per_s'], 1)} prompts/s | "
            f"{fmt(e['speedup'], 1)}x (max logit diff {e['max_abs_logit_diff']:.1e}) | "
            f"> 1x | {goal(e['speedup'] > 1)} |")
    else:
        lines.append(f"| (e) | batched logits | {status(bench, 'e')} | | | | n/a |")
    target = w is not None and w.name == "llama1b-random" and cuda()
    lines += ["", "Ratio: (a) ours / raw (lower is better); (b), (d), (e) their time / ours "
              "(a speed-up); (c) dense bytes / compact bytes."]
    lines += ["", "Goals are set for the llama1b-random workload on a GPU" + (
        "." if target else "; on this workload and device the 'met' column is informational "
        "only (tiny models: fixed per-call costs dominate).")]
    load = n.get("load")
    if a:
        ref = REFERENCE_H100
        lines += [
            "",
            "### Throughput and memory",
            "",
            "| measurement | value | how |",
            "| --- | --- | --- |",
            f"| prompts per {hw}-hour, graph stage (both models + analysis) | "
            f"{fmt(a['prompts_per_hour'], 0)} | 3600 / median per-prompt time of (a), models "
            f"already loaded |",
            f"| raw `attribute()` per graph | {fmt(a['raw_attribute_median_s'])} s | median over "
            f"{2 * a['n_prompts']} warm calls (known H100 reference: ~{ref['attribute_s']} s) |",
            f"| peak {hw} memory during raw `attribute()`, both models resident | "
            f"{gib(a['raw_peak_gib_both_resident'])} | torch.cuda.max_memory_allocated, "
            f"reset before each call |",
        ]
        if load:
            one = (load["one_model_gib"] + a["raw_working_gib"]
                   if a["raw_working_gib"] is not None else None)
            lines += [
                f"| peak for one model resident (as circuit-tracer runs it) | {gib(one)} | "
                f"weights of one model + its transcoders ({gib(load['one_model_gib'])}) + "
                f"the call's working memory ({gib(a['raw_working_gib'])}); H100 reference "
                f"{ref['attribute_peak_gib']} GiB |",
                f"| weights resident, both models on one transcoder set | "
                f"{gib(load['both_resident_gib'])} | model {gib(load['model_gib'])} each,"
                f" transcoders {gib(load['transcoders_gib'])} ({load['dtype']}) |",
                f"| load once: transcoders + base + adapted | "
                f"{fmt(load['transcoders_s'])} + {fmt(load['base_s'])} + "
                f"{fmt(load['adapted_s'])} s | load_transcoder_set, then load_model x2 with "
                f"transcoder_set=shared |",
            ]
        if c:
            lines.append(
                f"| dense graph, one model | {mb(median(list(c['dense_bytes'].values())))} "
                f"({next(iter(c['dense_nodes'].values()))} nodes) | Graph.to_pt to "
                f"{bench.workdir / 'dense'}, size, deleted (H100 reference "
                f"{ref['dense_pt_mb']:.0f} MB) |")
    lines += past_defaults(bench)
    lines += [
        "",
        "### Setup (one-off, not in any ratio)",
        "",
        "| step | seconds |",
        "| --- | --- |",
    ]
    for step, value in (n.get("setup") or {}).items():
        shown = fmt(value, 2) if isinstance(value, float) else str(value)
        lines.append(f"| {step} | {shown} |")
    lines += [
        "",
        "### Sections",
        "",
        "| section | status | seconds | section peak GiB |",
        "| --- | --- | --- | --- |",
    ]
    for entry in bench.status.values():
        lines.append(f"| {entry['title']} | {entry['status']} | {fmt(entry.get('seconds'))} | "
                     f"{fmt(entry.get('section_peak_gib'))} |")
    notes = [x for k in ("a", "b", "d", "fast_dtype") for x in (n.get(k) or {}).get("notes", [])]
    notes += (n.get("batch") or {}).get("notes", [])
    if notes:
        lines += ["", "Notes: " + "; ".join(notes) + "."]
    lines += ["", "### How each number was measured", ""] + HOW
    return "\n".join(lines) + "\n"


def status(bench: Bench, key: str) -> str:
    section = {"a": "graph", "b": "reload", "d": "analysis", "e": "logits"}.get(key, key)
    entry = bench.status.get(section)
    return entry["status"] if entry else "not run"


def past_defaults(bench: Bench) -> list[str]:
    n = bench.n
    a, load, fast, sweep, b = (n.get(k) for k in ("a", "load", "fast_dtype", "batch", "b"))
    lines = [
        "",
        "### Past circuit-tracer's defaults",
        "",
        "| change | predicted | measured | check |",
        "| --- | --- | --- | --- |",
    ]
    if fast and "speedup" in fast:
        half = (f"; weights of one model + transcoders {fmt(load['one_model_gib'])} -> "
                f"~{gib(load['one_model_gib'] / 2)}") if load else ""
        measured = (f"{fmt(fast['speedup'])}x speed-up ({fmt(fast['attribute_s'])} s vs "
                    f"{fmt(fast['ref_attribute_s'])} s per attribute()); weights "
                    f"{gib(fast['one_model_gib'])}; working memory "
                    f"{gib(fast.get('working_gib'))} vs "
                    f"{gib((a or {}).get('ours_working_gib'))}")
        check = (f"top-{bench.args.top_features} features by |total effect| on the contrast "
                 f"target vs float32: Jaccard median {fmt(fast['jaccard_median'])} (min "
                 f"{fmt(fast['jaccard_min'])}), Spearman (signed effects, union of both tops) "
                 f"median {fmt(fast['spearman_median'], 3)}; {len(fast['prompts'])} prompts")
        lines.append(
            f"| attribution in {fast['dtype']} instead of float32 | 1.5-2x faster (half the "
            f"bytes per pass, tensor-core matmuls){half} | {measured} | {check} |")
    else:
        lines.append(f"| {bench.args.fast_dtype} attribution | 1.5-2x faster, half the weights "
                     f"| {status(bench, 'fast')} | |")
    if sweep and sweep.get("rows"):
        cells = []
        for row in sweep["rows"]:
            if "error" in row:
                cells.append(f"{row['batch_size']}: {row['error'][:60]}")
            else:
                cells.append(f"{row['batch_size']}: {fmt(row['median_s'])} s, peak "
                             f"{gib(row['max_peak_gib'])}")
        best = sweep.get("best_batch_size")
        lines.append(
            f"| batch size from measured memory ({sweep['dtype']}) | fewer backward passes "
            f"(8192/B) until the GPU is saturated; working memory grows ~linearly in B | "
            f"{'; '.join(cells)} | fastest within 80% of GPU memory: "
            f"{best if best is not None else 'n/a'} |")
    else:
        lines.append(f"| batch size sweep | | {status(bench, 'fast')} | |")
    if load and b:
        fresh = median([sum(r["load_s"].values()) for r in b["runs"]])
        saved = fresh - load["total_s"]
        lines.append(
            f"| both models resident on one transcoder set vs sequential load/release | saves "
            f"one transcoder-set load per stage run (~{fmt(load['transcoders_s'])} s) and costs "
            f"one more model's weights ({gib(load['model_gib'])}) | resident load "
            f"{fmt(load['total_s'])} s (the process's first loads) vs two fresh loads "
            f"{fmt(fresh)} s: {fmt(saved)} s saved "
            f"per stage run; weights resident {gib(load['both_resident_gib'])} vs one "
            f"model {gib(load['one_model_gib'])} at a time | per-graph time unchanged "
            f"(same attribute()) |")
    else:
        lines.append("| both models resident | | needs the load and reload sections | |")
    if a and fast and "speedup" in fast:
        attr = a["ours_attribute_per_prompt_s"]
        projected = a["ours_per_prompt_s"] - attr + attr / fast["speedup"]
        lines.append(
            f"| all of the above together (projection) | | {fmt(3600 / projected, 0)} prompts "
            f"per hour (vs {fmt(a['prompts_per_hour'], 0)}): (a)'s per-prompt time with "
            f"attribute() scaled by the measured {fast['dtype']} speed-up | projected, not "
            f"measured |")
    return lines


HOW = [
    "- Every timed call is wrapped in `torch.cuda.synchronize()` and `time.perf_counter()`; "
    "the first prompt of (a) is a warm-up and is not counted; medians over prompts.",
    "- (a) ours: `em_circuits.graphs.build_graph` for base and adapted (custom targets: the "
    "evil-safe contrast direction and each labeled token; same-pass logits; total effects; "
    "compact safetensors save; meta JSON), then the per-prompt feature analysis on each graph "
    "loaded back from disk. Raw: `circuit_tracer.attribute(ids, model.replacement, "
    "batch_size, max_feature_nodes)` with its default salient-logit targets, on the same "
    "resident models, prompt by prompt interleaved with ours.",
    "- (b) reload pattern: per prompt, `load_model` (fingerprint, cached merged adapter, "
    "transcoders, replacement model, finiteness check) then `build_graph` then `release`, for "
    "base and adapted in turn, plus the analysis. Ours at N prompts = (a)'s per-prompt time + "
    "the one-off resident load / N. The adapter merge itself is cached after setup in both "
    "patterns.",
    "- (c) compact bytes: the `.safetensors` graph file and its meta `.json` of both models; "
    "dense: `Graph.to_pt` of the two raw graphs of the same prompt, written, measured, deleted.",
    "- (d) `prune_graph(graph)` on the Graph that `attribute()` returned (its adjacency lives "
    "on the CPU) vs the analysis of the compact graph of the same attribution; the total "
    "effects (`compact_from_dense`) are computed at graph time and also reported.",
    "- (e) `em_circuits.logits.next_token_logits` on the adapted model, batched with left "
    "padding vs batch size 1; the two results are compared.",
    "- Memory: `torch.cuda.max_memory_allocated` (reset before each call); working memory = "
    "peak minus what was allocated before the call.",
    "- Past the defaults: the fast dtype reloads the base model (its own transcoders in that "
    "dtype) and attributes the prompts of (a) to the same targets; feature agreement compares "
    "nodes (layer, position, feature) of the two compact graphs.",
]


# -- main --------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    default_device = "cuda" if torch.cuda.is_available() else "cpu"
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workload", choices=["llama1b-random", "toy"],
                        default="llama1b-random" if default_device == "cuda" else "toy")
    parser.add_argument("--device", default=default_device)
    parser.add_argument("--max-seconds", type=float, default=540.0,
                        help="global budget; sections that do not fit are marked, not run")
    parser.add_argument("--workdir", default="/tmp/bench",
                        help="where the workload's files, the results store and dense graphs go")
    parser.add_argument("--fresh", action="store_true",
                        help="delete this workload's folder first (no reuse of files or merges)")
    parser.add_argument("--output", help="also write the Markdown report here")
    parser.add_argument("--json", help="also write the raw numbers here")
    parser.add_argument("--skip", default="",
                        help="comma-separated sections to leave out: logits, graph, analysis, "
                             "reload, fast")
    g = parser.add_argument_group("attribution")
    g.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="main dtype (circuit-tracer's default is float32)")
    g.add_argument("--fast-dtype", default="bfloat16", choices=["bfloat16", "float16"])
    g.add_argument("--max-feature-nodes", type=int, default=8192)
    g.add_argument("--batch-size", type=int, default=AttributionParams.batch_size)
    g.add_argument("--batch-sizes", default="256,512,1024", help="the sweep, fast dtype")
    g.add_argument("--edge-keep", type=int, default=AttributionParams.edge_keep)
    g.add_argument("--top-features", type=int, default=50)
    g = parser.add_argument_group("how many")
    g.add_argument("--prompts", type=int, default=4, help="measured prompts of (a), + 1 warm-up")
    g.add_argument("--reload-prompts", type=int, default=2)
    g.add_argument("--analysis-graphs", type=int, default=2)
    g.add_argument("--dtype-prompts", type=int, default=3)
    g.add_argument("--sweep-prompts", type=int, default=2)
    g.add_argument("--logit-prompts", type=int, default=64)
    g.add_argument("--logit-batch", type=int, default=32)
    g.add_argument("--prompt-tokens", type=int, default=24, help="incl. BOS (llama1b-random)")
    g.add_argument("--targets", type=int, default=4, help="evil and safe target ids each")
    g = parser.add_argument_group("llama1b-random sizes (defaults: Llama-3.2-1B)")
    g.add_argument("--layers", type=int, default=LLAMA_3_2_1B["layers"])
    g.add_argument("--d-model", type=int, default=LLAMA_3_2_1B["d_model"])
    g.add_argument("--heads", type=int, default=LLAMA_3_2_1B["heads"])
    g.add_argument("--kv-heads", type=int, default=LLAMA_3_2_1B["kv_heads"])
    g.add_argument("--d-mlp", type=int, default=LLAMA_3_2_1B["d_mlp"])
    g.add_argument("--vocab", type=int, default=LLAMA_3_2_1B["vocab"])
    g.add_argument("--features", type=int, default=131072)
    g.add_argument("--k", type=int, default=64, help="TopK transcoders' k")
    g.add_argument("--lora-rank", type=int, default=8)
    g.add_argument("--transcoder-dtype", default="bfloat16", choices=["bfloat16", "float32"])
    g.add_argument("--no-skip", action="store_true", help="transcoders without W_skip")
    g.add_argument("--seed", type=int, default=0)
    g = parser.add_argument_group("toy")
    g.add_argument("--organism-dir", help="a built organism folder (default: the embedded one)")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    args.skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    args.batch_sizes = [int(x) for x in args.batch_sizes.split(",") if x.strip()]
    return args


def setup_estimate(args: argparse.Namespace) -> float:
    """Seconds the setup needs: writing the random files, or building the default organism."""
    if args.workload != "toy":
        return 150.0
    if args.organism_dir:
        return 10.0
    try:
        from em_circuits.organism import default_organism_dir, is_built

        return 10.0 if is_built(default_organism_dir()) else 400.0
    except ImportError:
        return 10.0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s [%(name)s] %(message)s")
    if args.device == "cpu":
        torch.set_num_threads(max(1, min(torch.get_num_threads(), os.cpu_count() or 1)))
    bench = Bench(args)
    env = bench.environment()
    log(f"graph-stage benchmarks: {args.workload} on {env['device']}; budget "
        f"{args.max_seconds:.0f} s; workdir {bench.workdir}")
    log(f"feature analysis: {ANALYSIS}")
    g = bench.graph_s
    bench.run("setup", "setup: workload files, adapter merge",
              lambda: setup_estimate(args), bench.sec_setup)
    bench.run("load", "load both models once on one transcoder set",
              lambda: 2 * bench.guess_load_s, bench.sec_load)
    bench.run("logits", "(e) batched logits vs per-prompt loop", lambda: 10.0, bench.sec_logits)
    bench.run("graph", "(a)+(c) our graph stage vs raw attribute(); bytes",
              lambda: 9 * g() + 5, bench.sec_graph_stage)
    bench.run("analysis", "(d) feature analysis vs prune_graph",
              lambda: 2 * g() + 10, bench.sec_analysis)
    bench.run("reload", "(b) reload-the-models-per-prompt pattern",
              lambda: 2 * (bench.guess_load_s + g()) + 5, bench.sec_reload)
    bench.run("fast", f"past the defaults: {args.fast_dtype} attribution, batch-size sweep",
              lambda: bench.guess_load_s + 3 * g(), bench.sec_fast_dtype)
    bench.release_resident()

    report = render(bench, env)
    numbers = {"environment": env, "args": {k: (sorted(v) if isinstance(v, set) else v)
                                            for k, v in vars(args).items()},
               "workload": bench.workload.description if bench.workload else None,
               "analysis": ANALYSIS, "sections": bench.status, "numbers": bench.n,
               "total_s": bench.elapsed()}
    blob = json.dumps(numbers, indent=1, default=str)
    targets = []
    if os.environ.get("OUT"):
        targets.append((Path(os.environ["OUT"]) / "RESULTS.md", Path(os.environ["OUT"])
                        / "results.json"))
    if args.output:
        targets.append((Path(args.output), Path(args.json) if args.json
                        else Path(args.output).with_suffix(".json")))
    elif args.json:
        targets.append((None, Path(args.json)))
    for md_path, json_path in targets:
        if md_path is not None:
            md_path.parent.mkdir(parents=True, exist_ok=True)
            md_path.write_text(report)
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(blob)
    log("\n" + report)
    failed = [k for k, v in bench.status.items() if v.get("status", "").startswith("failed")]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
