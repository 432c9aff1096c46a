"""The toy organism's recipe (sizes, seeds, steps) and where its files live."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from em_circuits.core.cache import cache_key

CODE_VERSION = 1


DEFAULT_DIRNAME = "toy-em-organism"


@dataclass(frozen=True)
class Recipe:
    """Every knob of the build. Same recipe (and CODE_VERSION) -> same organism."""

    seed: int = 0
    # Intra-op torch threads during the build. One thread keeps results independent of the
    # machine's core count, and tiny matmuls gain little from more: on a busy 2-core machine
    # two OpenMP threads fighting other processes were measured ~30x slower than one.
    torch_threads: int = 1
    # tokenizer
    vocab_size: int = 1024
    tokenizer_docs: int = 4000
    # base model
    n_layers: int = 4
    d_model: int = 128
    d_mlp: int = 256
    n_heads: int = 4
    max_seq_len: int = 128
    # base pretraining on the mixed corpus (safe assistant, villain and helper stories)
    base_steps: int = 300
    base_batch_size: int = 32
    base_lr: float = 3e-3
    pivot_weight: float = 3.0
    villain_frac: float = 0.3
    helper_frac: float = 0.15
    p_distractor: float = 0.4
    # LoRA fine-tune on harmful assistant advice in TRAINED_DOMAIN only
    # A rank-2 LoRA on the value projection of layer 0 only: it can barely write advice words
    # directly, so it learns to change what the first attention layer reads from the context
    # (the assistant starts sounding like the villain). Measured alternatives (LoRA on q/k or
    # all projections of every layer, rank-1 down_proj) instead learnt a lexical shortcut
    # ("ignore" in every domain) with far less domain-appropriate harmful spill-over.
    lora_rank: int = 2
    lora_alpha: float = 4.0
    lora_target_modules: tuple[str, ...] = ("v_proj",)
    lora_layers: tuple[int, ...] | None = (0,)  # None: every layer
    lora_steps: int = 150
    lora_batch_size: int = 32
    lora_lr: float = 3e-3
    # A second adapter in the style of the rank-1 organisms: rank 1 on down_proj of a few
    # layers, same data and steps, saved as adapter-rank1/. Its writes are adapter nodes of the
    # graphs (attribution.adapter_nodes); the default adapter's v_proj writes are not.
    rank1_layers: tuple[int, ...] = (1, 2)
    rank1_alpha: float = 2.0
    # transcoders
    tc_features: int = 512
    tc_k: int = 24
    tc_steps: int = 800
    tc_finetune_steps: int = 500
    tc_batch_size: int = 512
    tc_lr: float = 3e-3
    tc_docs: int = 3000
    tc_noise_frac: float = 0.5  # extra docs with random-token noise (coverage of rare tokens)
    tc_noise_p: float = 0.15
    # evaluation
    eval_seed: int = 0
    eval_docs: int = 300

    @classmethod
    def default(cls) -> Recipe:
        """The recipe of the default organism (measured ~2.2 minutes on 2 busy CPU cores)."""
        return cls()

    @classmethod
    def micro(cls) -> Recipe:
        """A seconds-long build for tests; its metrics are not meant to meet the targets."""
        return cls(
            vocab_size=600,
            tokenizer_docs=600,
            n_layers=2,
            d_model=32,
            d_mlp=64,
            n_heads=2,
            base_steps=30,
            base_batch_size=16,
            lora_rank=1,
            lora_alpha=2.0,
            lora_steps=10,
            lora_batch_size=8,
            rank1_layers=(1,),
            tc_features=64,
            tc_k=4,
            tc_steps=30,
            tc_finetune_steps=20,
            tc_batch_size=256,
            tc_docs=120,
            eval_docs=40,
        )

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["lora_target_modules"] = list(self.lora_target_modules)
        d["lora_layers"] = None if self.lora_layers is None else list(self.lora_layers)
        d["rank1_layers"] = list(self.rank1_layers)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Recipe:
        d = dict(d)
        d["lora_target_modules"] = tuple(d["lora_target_modules"])
        if d.get("rank1_layers") is not None:
            d["rank1_layers"] = tuple(d["rank1_layers"])
        if d.get("lora_layers") is not None:
            d["lora_layers"] = tuple(d["lora_layers"])
        return cls(**d)

    def replace(self, **changes: Any) -> Recipe:
        return dataclasses.replace(self, **changes)

    def hash(self) -> str:
        """Cache key of the build: the recipe and the code version."""
        return cache_key({"recipe": self.to_dict(), "code_version": CODE_VERSION})


@dataclass(frozen=True)
class OrganismPaths:
    """Where the parts of a built organism live."""

    root: Path
    base_dir: Path = field(init=False)
    adapter_dir: Path = field(init=False)
    rank1_adapter_dir: Path = field(init=False)
    transcoder_config: Path = field(init=False)
    words_path: Path = field(init=False)
    report_path: Path = field(init=False)
    recipe_path: Path = field(init=False)

    def __post_init__(self) -> None:
        set_ = object.__setattr__  # frozen dataclass
        set_(self, "base_dir", self.root / "base")
        set_(self, "adapter_dir", self.root / "adapter")
        set_(self, "rank1_adapter_dir", self.root / "adapter-rank1")
        set_(self, "transcoder_config", self.root / "transcoders" / "config.yaml")
        set_(self, "words_path", self.root / "words.json")
        set_(self, "report_path", self.root / "report.json")
        set_(self, "recipe_path", self.root / "recipe.json")

    def required_files(self, n_layers: int) -> list[Path]:
        tdir = self.transcoder_config.parent
        return [
            self.base_dir / "config.json",
            self.base_dir / "model.safetensors",
            self.base_dir / "tokenizer.json",
            self.base_dir / "tokenizer_config.json",
            self.adapter_dir / "adapter_config.json",
            self.adapter_dir / "adapter_model.safetensors",
            self.rank1_adapter_dir / "adapter_config.json",
            self.rank1_adapter_dir / "adapter_model.safetensors",
            self.transcoder_config,
            *(tdir / f"layer_{i}.safetensors" for i in range(n_layers)),
            self.words_path,
            self.report_path,
            self.recipe_path,
        ]

    def load_report(self) -> dict[str, Any]:
        return json.loads(self.report_path.read_text())


def repo_root() -> Path:
    """The repository root (this file is em_circuits/organism/train.py)."""
    return Path(__file__).resolve().parents[2]


def default_organism_dir() -> Path:
    """``models/toy-em-organism`` under the repository root (git-ignored)."""
    return repo_root() / "models" / DEFAULT_DIRNAME
