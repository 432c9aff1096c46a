"""Hub ids from the Hugging Face cache, offline: they load, and their identity is the commit
they resolve to (a new commit of an adapter is a new model, not the old merge)."""

from __future__ import annotations

import shutil

import pytest
from standins import build_standin, cache_repo

from em_circuits.models import spec as spec_module
from em_circuits.models import transcoder_source as source_module
from em_circuits.models.load import load_model
from em_circuits.models.spec import ModelSpec, fingerprint, model_slug


@pytest.fixture()
def hf_cache(tmp_path, monkeypatch):
    """An empty Hugging Face cache that this process's hub lookups use (offline)."""
    import huggingface_hub.constants as constants

    home = tmp_path / "hf"
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setattr(spec_module, "_RESOLVED", {})
    monkeypatch.setattr(source_module, "_TRANSCODERS", {})
    return home


def test_hub_ids_load_offline_and_a_new_adapter_commit_is_a_new_model(hf_cache, tmp_path):
    standin = build_standin("llama", tmp_path / "build", hf_home=hf_cache)
    spec = ModelSpec(
        base=standin.family.base_id,
        adapter=standin.family.adapter_id,
        transcoders=str(standin.transcoder_config),
    )
    first = fingerprint(spec, "cpu")
    model = load_model(spec, "cpu", tmp_path / "merged")
    assert model.slug == model_slug(spec, first)
    assert model.merge_report is not None and model.merge_report.changed
    # The adapter's owner pushes new weights: the cache gets a new commit and refs/main moves.
    rebuilt = build_standin("llama", tmp_path / "rebuild", seed=7)
    shutil.copy(
        rebuilt.adapter_dir / "adapter_model.safetensors",
        tmp_path / "build" / "llama" / "adapter" / "adapter_model.safetensors",
    )
    new_snapshot = cache_repo(
        tmp_path / "build" / "llama" / "adapter", standin.family.adapter_id, hf_cache
    )
    assert new_snapshot.name != standin.adapter_dir.name
    spec_module._RESOLVED.clear()  # a later run resolves the id again
    second = fingerprint(spec, "cpu")
    assert second != first
    # the base did not change: its part of the identity is the same commit and content
    assert fingerprint(spec.base_only(), "cpu") == fingerprint(spec.base_only(), "cpu")


def _cache_transcoder_repo(standin, repo_id: str, hf_home, uris: bool):
    """The stand-in's transcoders as a hub repository in the cache; its config lists the layer
    files as hf:// URIs (as circuit-tracer's presets do) or as paths relative to itself."""
    import yaml

    folder = standin.transcoder_config.parent
    config = yaml.safe_load(standin.transcoder_config.read_text())
    if uris:
        config["transcoders"] = [f"hf://{repo_id}/{name}" for name in config["transcoders"]]
    repo = folder.parent / repo_id.replace("/", "--")
    shutil.copytree(folder, repo)
    (repo / "config.yaml").write_text(yaml.safe_dump(config))
    return cache_repo(repo, repo_id, hf_home)


def test_cached_preset_and_snapshot_configs_load_offline(hf_cache, tmp_path):
    import torch

    from em_circuits.models.load import load_transcoder_set
    from em_circuits.models.spec import ModelLoadError
    from em_circuits.models.transcoder_source import resolve_transcoders

    standin = build_standin("llama", tmp_path / "build", hf_home=hf_cache)
    _cache_transcoder_repo(standin, "mntss/transcoder-Llama-3.2-1B", hf_cache, uris=True)
    transcoders = load_transcoder_set("llama", torch.device("cpu"), torch.float32)
    assert len(list(transcoders)) == 2
    spec = ModelSpec(base=standin.family.base_id, transcoders="llama")
    assert fingerprint(spec, "cpu")  # resolved from the cache, no network
    # a config inside a snapshot names its files relative to the snapshot, not blobs/
    snapshot = _cache_transcoder_repo(standin, "someone/tcs", hf_cache, uris=False)
    source = resolve_transcoders(str(snapshot / "config.yaml"))
    assert all(p.parent == snapshot for p in source.files)
    assert load_transcoder_set(str(snapshot), torch.device("cpu"), torch.float32)
    # not cached and offline: at once, in one line; a mistyped local path is not a hub id
    with pytest.raises(ModelLoadError, match="HF_HUB_OFFLINE") as err:
        resolve_transcoders("someone/not-cached")
    assert "\n" not in str(err.value)
    with pytest.raises(ModelLoadError, match="does not exist"):
        resolve_transcoders("my_transcoders/config.yaml")


@pytest.mark.slow
def test_doctor_says_what_an_offline_run_lacks(tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    hf_home = tmp_path / "hf"
    standin = build_standin("qwen2", tmp_path / "build", hf_home=hf_home)
    words = tmp_path / "words.json"
    words.write_text('{"harmful": ["ignore"], "safe": ["see"]}')
    env = {**os.environ, "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1"}
    env.pop("OPENAI_API_KEY", None)

    def doctor(*flags: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "em_circuits.cli.main", "doctor", "--device", "cpu", *flags],
            capture_output=True,
            text=True,
            env=env,
            cwd=Path(__file__).resolve().parents[1],
            timeout=300,
        )

    model = [
        "--base-model",
        standin.family.base_id,
        "--transcoders",
        str(standin.transcoder_config),
    ]
    ready = doctor(*model, "--adapter", standin.family.adapter_id, "--words", str(words))
    assert ready.returncode == 0, ready.stdout + ready.stderr
    assert "Qwen2ForCausalLM" in ready.stdout and "nothing missing" in ready.stdout
    assert "read through the tokenizer's chat template" in ready.stdout
    lacking = doctor(*model, "--adapter", "ModelOrganismsForEM/not-downloaded")
    assert lacking.returncode == 1
    lines = lacking.stdout.splitlines()
    assert any(line.startswith("MISSING") and "adapter" in line for line in lines)
    assert any(line.startswith("MISSING") and "--words FILE" in line for line in lines)


def test_a_mistyped_local_path_is_missing_before_any_hub_call(tmp_path, monkeypatch, capsys):
    """A path (absolute, or under a folder that exists here) that does not exist is MISSING
    in doctor and a one-line error at load, never "will be downloaded" or a hub timeout."""
    from em_circuits.cli import doctor
    from em_circuits.models.spec import ModelLoadError, resolve_model_dir

    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    missing_base = str(tmp_path / "no" / "such" / "base")
    argv = ["--device", "cpu", "--base-model", missing_base]
    argv += ["--adapter", "models/no-such-adapter", "--transcoders", "llama"]
    assert doctor.main(argv) == 1
    lines = capsys.readouterr().out.splitlines()
    base_line = next(line for line in lines if "base model" in line)
    adapter_line = next(line for line in lines if line.split()[1:2] == ["adapter"])
    assert base_line.startswith("MISSING") and missing_base in base_line
    assert "does not exist" in base_line and "downloaded" not in base_line
    assert adapter_line.startswith("MISSING") and "does not exist" in adapter_line
    assert "'models' is a folder here" in adapter_line
    for ref in (missing_base, "models/no-such-adapter", "./base", "~/no-such-model-here"):
        with pytest.raises(ModelLoadError, match="does not exist") as err:
            resolve_model_dir(ref, what="adapter")
        assert "\n" not in str(err.value) and "Hub" not in str(err.value)
