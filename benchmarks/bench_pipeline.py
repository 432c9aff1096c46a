#!/usr/bin/env python
"""The whole pipeline, stage by stage, on random models of real organisms' shapes (issue 15).

For each shape (``--shapes``) this builds, under ``--workdir``, a randomly initialised model
with the real architecture and sizes (Llama-3.2-1B-Instruct: LlamaForCausalLM, 16 layers,
width 2048, vocabulary 128,256; Qwen2.5-0.5B-Instruct: Qwen2ForCausalLM, 24 layers, width
896, vocabulary 151,936), a byte-level tokenizer carrying the family's chat template (the test
suite's stand-in tokenizer), a PEFT LoRA adapter of the most common EM shape (rank 32, alpha
64, on every linear module), per-layer TopK transcoders with a skip connection, and word lists
for the offline judge. Then it runs ``em-circuits run`` on them in bfloat16 from an empty
results folder, and once more with everything stored, and records each stage's seconds from
the pipeline's own log.

The random model's tied embedding rows beyond the tokenizer's ~600 ids are zero, so its
next-token choices fall on real tokenizer words that the judge can label; the unembedding
still spans the full vocabulary, so every stage does the real model's work.

Writes ``pipeline[-tiny]-<device>.json`` (see harness.py), after each shape.

Examples::

    python benchmarks/bench_pipeline.py                       # both shapes, on cuda
    python benchmarks/bench_pipeline.py --device cpu --tiny   # the same path at toy sizes
    python benchmarks/bench_pipeline.py --smoke --device cpu  # one shape, tiny, 2 prompts
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import harness  # the offline switches and the import path first
import torch
from harness import REPO

LLAMA_ROPE = {
    "rope_type": "llama3",
    "factor": 32.0,
    "high_freq_factor": 4.0,
    "low_freq_factor": 1.0,
    "original_max_position_embeddings": 8192,
}

# The published configs' sizes (config.json of each hub model).
SHAPES: dict[str, dict[str, Any]] = {
    "llama-3.2-1b-instruct": {
        "family": "llama",
        "config": {
            "hidden_size": 2048,
            "intermediate_size": 8192,
            "num_hidden_layers": 16,
            "num_attention_heads": 32,
            "num_key_value_heads": 8,
            "head_dim": 64,
            "vocab_size": 128256,
            "max_position_embeddings": 131072,
            "rope_theta": 500000.0,
            "rope_scaling": LLAMA_ROPE,
            "rms_norm_eps": 1e-5,
            "tie_word_embeddings": True,
        },
        "features": 131072,  # circuit-tracer's Llama-3.2-1B transcoders' width
    },
    "qwen2.5-0.5b-instruct": {
        "family": "qwen2",
        "config": {
            "hidden_size": 896,
            "intermediate_size": 4864,
            "num_hidden_layers": 24,
            "num_attention_heads": 14,
            "num_key_value_heads": 2,
            "vocab_size": 151936,
            "max_position_embeddings": 32768,
            "rope_theta": 1000000.0,
            "rms_norm_eps": 1e-6,
            "tie_word_embeddings": True,
            "use_sliding_window": False,
        },
        "features": 32768,  # no public set exists; a plausible self-trained width
    },
}
TINY = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "vocab_size": 1000,
}
LORA_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
STAGE_LINE = re.compile(r"\[(\w+)\] done in ([0-9.]+) s")
# The analysis runner's line per step (the features stage's parts).
STEP_LINE = re.compile(r"steps\.runner\] (\w+): done in ([0-9.]+) s")


def log(message: str) -> None:
    print(f"[bench_pipeline {time.strftime('%H:%M:%S')}] {message}", flush=True)


def build_organism(shape: str, root: Path, device: torch.device, tiny: bool) -> dict[str, Any]:
    """Base model + tokenizer, LoRA adapter, transcoders and judge words; seconds per step."""
    import transformers
    from peft import LoraConfig, get_peft_model
    from random_model import write_random_transcoders
    from standins import FAMILIES, build_tokenizer

    from em_circuits.core.toy_corpus import advice_words

    info = SHAPES[shape]
    family = FAMILIES[info["family"]]
    sizes = {**info["config"], **(TINY if tiny else {})}
    n_features = 4096 if tiny else info["features"]
    base_dir, adapter_dir = root / "base", root / "adapter"
    transcoder_dir, words_path = root / "transcoders", root / "words.json"
    done = root / "built.json"
    if done.is_file():
        return json.loads(done.read_text())
    times: dict[str, float] = {}

    start = time.perf_counter()
    words = advice_words()
    tokenizer = build_tokenizer(family, words["harmful"] + words["safe"])
    config_class = getattr(transformers, family.config_class)
    fields = {**family.config, **sizes}
    for role in ("bos", "eos", "pad"):
        token = family.specials[role]
        fields[f"{role}_token_id"] = tokenizer.convert_tokens_to_ids(token) if token else None
    config = config_class(**fields)
    config.architectures = [family.config_class.replace("Config", "ForCausalLM")]
    torch.manual_seed(0)
    with torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    with torch.no_grad():  # next-token choices fall on the tokenizer's words (see above)
        model.get_input_embeddings().weight[len(tokenizer) :] = 0
    model.eval().save_pretrained(base_dir)
    tokenizer.save_pretrained(base_dir)
    times["random base model + tokenizer"] = time.perf_counter() - start

    start = time.perf_counter()
    lora = LoraConfig(r=32, lora_alpha=64, target_modules=LORA_MODULES, lora_dropout=0.0)
    peft_model = get_peft_model(model, lora)
    gen = torch.Generator(device="cpu").manual_seed(1)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:  # PEFT starts B at zero; a random B changes the model
                noise = torch.randn(param.shape, generator=gen) * 0.02
                param.copy_(noise.to(param.device, param.dtype))
    peft_model.peft_config["default"].base_model_name_or_path = str(base_dir)
    peft_model.save_pretrained(adapter_dir)
    del peft_model, model
    times["random rank-32 all-linear LoRA adapter"] = time.perf_counter() - start

    cfg = {
        "d_model": sizes["hidden_size"],
        "features": n_features,
        "k": 64 if not tiny else 16,
        "transcoder_dtype": "bfloat16",
        "skip": True,
        "layers": sizes["num_hidden_layers"],
        "seed": 0,
    }
    times["random TopK transcoders"] = write_random_transcoders(cfg, transcoder_dir, device)

    vocab_words = sorted(
        {
            word.lower()
            for word in (tokenizer.decode([i]).strip() for i in range(len(tokenizer)))
            if word.isalpha() and word.isascii()
        }
    )  # every word the tokenizer has, alternately harmful and safe: the judge labels all
    words_path.write_text(json.dumps({"harmful": vocab_words[::2], "safe": vocab_words[1::2]}))
    built = {
        "shape": shape,
        "architecture": config.architectures[0],
        "sizes": sizes,
        "transcoders": {"features": n_features, "k": cfg["k"], "activation": "topk", "skip": True},
        "adapter": {"rank": 32, "alpha": 64, "modules": LORA_MODULES},
        "tokenizer_ids": len(tokenizer),
        "setup_seconds": times,
        "paths": {
            "base": str(base_dir),
            "adapter": str(adapter_dir),
            "transcoders": str(transcoder_dir / "config.yaml"),
            "words": str(words_path),
        },
    }
    done.write_text(json.dumps(built, indent=2))
    return built


def run_pipeline(built: dict[str, Any], results: Path, args: argparse.Namespace) -> dict[str, Any]:
    """``em-circuits run`` in a fresh process; each stage's seconds from its log."""
    paths = built["paths"]
    command = [
        sys.executable,
        "-m",
        "em_circuits.cli.main",
        "run",
        "--results-dir",
        str(results),
        "--base-model",
        paths["base"],
        "--adapter",
        paths["adapter"],
        "--transcoders",
        paths["transcoders"],
        "--words",
        paths["words"],
        "--device",
        args.device,
        "--dtype",
        args.dtype,
        "--n-prompts",
        str(args.prompts),
    ]
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": path}
    env.pop("OPENAI_API_KEY", None)
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, cwd=REPO, env=env)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        print(done.stderr[-6000:], file=sys.stderr)
        raise SystemExit(f"em-circuits run failed ({done.returncode})")
    stages = {name: float(sec) for name, sec in STAGE_LINE.findall(done.stderr)}
    steps = {name: float(sec) for name, sec in STEP_LINE.findall(done.stderr)}
    report = json.loads((results / "report.json").read_text())
    return {
        "wall_seconds": wall,
        "stage_seconds": stages,
        "step_seconds": steps,
        "counts": report["counts"],
        "log_tail": done.stderr.splitlines()[-40:],
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--prompts", type=int, default=40)
    parser.add_argument("--workdir", default="/tmp/bench-pipeline")
    parser.add_argument("--tiny", action="store_true", help="toy sizes (a CPU check)")
    harness.add_common_options(parser, dtype="bfloat16")
    args = parser.parse_args(argv)
    if args.smoke:
        args.shapes, args.tiny, args.prompts = args.shapes[:1], True, 2
    device = torch.device(args.device)
    measured: dict[str, Any] = {"shapes": {}}
    for shape in args.shapes:
        root = Path(args.workdir) / (shape + ("-tiny" if args.tiny else ""))
        log(f"{shape}: building the random organism under {root}")
        built = build_organism(shape, root, device, args.tiny)
        log(f"{shape}: setup {json.dumps(built['setup_seconds'])}")
        results = root / f"results-{int(time.time())}"
        first = run_pipeline(built, results, args)
        log(f"{shape}: first run {first['wall_seconds']:.1f} s: {first['stage_seconds']}")
        again = run_pipeline(built, results, args)
        log(f"{shape}: second run {again['wall_seconds']:.1f} s: {again['stage_seconds']}")
        measured["shapes"][shape] = {**built, "first_run": first, "second_run": again}
        path = harness.write_record(args, "pipeline-tiny" if args.tiny else "pipeline", measured)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    print(render(json.loads(path.read_text())))


def render(measured: dict[str, Any]) -> str:
    stages = ["prompts", "logits", "labels", "graphs", "features", "report"]
    lines = [
        f"Device: {measured['device']}; {measured['date']}; dtype {measured['args']['dtype']}; "
        f"{measured['args']['prompts']} prompts.",
        "",
        "| shape | run | " + " | ".join(stages) + " | process wall | graphs (base/adapted) |",
        "|---|---|" + "---:|" * (len(stages) + 2),
    ]
    for shape, entry in measured["shapes"].items():
        for run in ("first_run", "second_run"):
            got = entry[run]
            cells = [f"{got['stage_seconds'].get(s, math.nan):.1f}" for s in stages]
            graphs = got["counts"].get("graphs", {})
            lines.append(
                f"| {shape} | {run.replace('_', ' ')} | "
                + " | ".join(cells)
                + f" | {got['wall_seconds']:.1f} | {graphs.get('base')}/{graphs.get('adapted')} |"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
