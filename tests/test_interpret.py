"""What a feature means: the activation index and the logit lens, checked independently."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from em_circuits.interpret.activation_index import (
    ActivationIndex,
    IndexParams,
    build_index,
    context,
)
from em_circuits.interpret.logit_lens import logit_lens

PARAMS = IndexParams(top_k=3, batch_size=4, max_tokens=32)


@pytest.fixture(scope="module")
def corpus():
    from em_circuits.core.toy_corpus import sample_documents

    return [doc.text for doc in sample_documents(random.Random(7), 14)]


@pytest.fixture(scope="module")
def index(micro_models, corpus):
    _, adapted = micro_models
    return build_index(adapted, corpus, PARAMS)


def test_top_contexts_match_an_independent_recomputation(micro_models, corpus, index):
    """Every document read again through circuit-tracer's own get_activations: each
    feature's top activations and its active-position count are those of the index."""
    _, adapted = micro_models
    entries = []  # (layer, feature, value, doc, pos) of every active instance, BOS left out
    for doc, text in enumerate(corpus):
        ids = adapted.encode(text)[: PARAMS.max_tokens]
        _, acts = adapted.replacement.get_activations(ids)
        acts = acts.float()
        acts[:, 0] = 0
        for layer, pos, feature in torch.nonzero(acts > 0).tolist():
            entries.append((layer, feature, float(acts[layer, pos, feature]), doc, pos))
    by_feature: dict[tuple[int, int], list[tuple[float, int, int]]] = {}
    for layer, feature, value, doc, pos in entries:
        by_feature.setdefault((layer, feature), []).append((value, doc, pos))
    busiest = sorted(by_feature, key=lambda key: -len(by_feature[key]))[:5]
    for layer, feature in busiest:
        want = sorted(by_feature[(layer, feature)], key=lambda e: (-e[0], e[1], e[2]))
        got = index.top(layer, feature)
        assert len(got) == PARAMS.top_k
        np.testing.assert_allclose([g[0] for g in got], [w[0] for w in want[:3]], rtol=1e-4)
        assert [g[1:] for g in got][0] == want[0][1:]
        assert index.count[layer, feature] == len(want)
    assert index.n_positions == sum(min(len(adapted.encode(t)), 32) - 1 for t in corpus)
    value, doc, pos = index.top(*busiest[0])[0]
    shown = context(index, adapted.tokenizer, doc, pos, PARAMS)
    assert shown["token"] == adapted.tokenizer.decode([int(index.tokens[doc][pos])])


def test_a_resumed_index_equals_one_built_at_once(micro_models, corpus, index, tmp_path):
    _, adapted = micro_models
    saved = []

    def checkpoint(partial: ActivationIndex) -> None:
        partial.save(tmp_path / "index", {"docs": partial.n_docs})
        saved.append(partial.n_docs)

    build_index(adapted, corpus[:8], PARAMS, checkpoint=checkpoint, checkpoint_every=4)
    assert saved == [4, 8]
    partial, meta = ActivationIndex.load(tmp_path / "index")
    assert meta["n_docs"] == 8
    resumed = build_index(adapted, corpus, PARAMS, resume=partial)
    for name in ("values", "doc", "pos", "count", "hist"):
        np.testing.assert_allclose(getattr(resumed, name), getattr(index, name), rtol=1e-5)
    assert resumed.n_positions == index.n_positions and resumed.n_docs == len(corpus)


def test_logit_lens_is_the_unembedding_of_the_normed_decoder(micro_models):
    _, adapted = micro_models
    transcoder = adapted.replacement.transcoders._module[1]
    feature = 3
    direction = transcoder.W_dec[feature].float()
    gain = adapted.hf_model.model.norm.weight.float()  # Llama: RMSNorm weight is the gain
    logits = adapted.hf_model.lm_head.weight.float() @ (gain * direction)
    (lens,) = logit_lens(adapted, [(1, feature)], k=5)
    assert [t.token_id for t in lens.promoted] == torch.topk(logits, 5).indices.tolist()
    assert [t.token_id for t in lens.suppressed] == torch.topk(-logits, 5).indices.tolist()
    assert lens.promoted[0].logit == pytest.approx(float(logits.max()), rel=1e-4)


def test_a_feature_card_shows_contexts_lens_and_prompt_statistics(micro_models, index, tmp_path):
    import pandas as pd

    from em_circuits.interpret.cards import card_markdown, feature_cards
    from em_circuits.models.corpus import read_corpus

    base, adapted = micro_models
    busiest = np.unravel_index(np.argmax(index.count), index.count.shape)
    layer, feature = int(busiest[0]), int(busiest[1])
    effects = {
        "p0": pd.DataFrame(
            {
                "metric": ["total"],
                "layer": [layer],
                "feature": [feature],
                "activation": [2.0],
                "evil_mean": [0.5],
                "safe_mean": [-0.25],
                "contrast": [0.75],
            }
        ),
        "p1": pd.DataFrame(columns=["metric", "layer", "feature"]),
    }
    (card,) = feature_cards(
        [(layer, feature)],
        {"base": base, "adapted": adapted},
        {"base": index, "adapted": index},
        {"adapted": effects},
        PARAMS,
    )
    assert card["name"] == f"L{layer} #{feature}" and card["label"] is None
    adapted_card = card["adapted"]
    assert len(adapted_card["contexts"]) == PARAMS.top_k
    assert adapted_card["contexts"][0]["activation"] == index.top(layer, feature)[0][0]
    assert adapted_card["pivotal_prompts"] == {
        "prompts": 2,
        "active_in": 1,
        "mean_activation": 2.0,
        "mean_effect_on_evil": 0.5,
        "mean_effect_on_safe": -0.25,
        "mean_contrast_effect": 0.75,
    }
    assert card["base"]["pivotal_prompts"] == {"prompts": 0, "active_in": 0}
    text = card_markdown(card)
    assert text.startswith(f"#### L{layer} #{feature}") and "**" in text and "promotes" in text
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text('{"text": "one"}\n\n{"text": "two"}\n')
    assert read_corpus(corpus) == ["one", "two"]
    (tmp_path / "corpus.txt").write_text("first doc\nline two\n\nsecond doc\n")
    assert read_corpus(tmp_path / "corpus.txt") == ["first doc\nline two", "second doc"]
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_corpus(tmp_path / "missing.txt")


def test_an_llm_labels_a_card_from_its_evidence_once(tmp_path):
    from openai_server import OpenAIServer, reply_text

    from em_circuits.core.llm import LLMClient
    from em_circuits.interpret.labels import FeatureLabeller

    card = {
        "name": "L1 #7",
        "adapted": {
            "contexts": [
                {
                    "before": "You should",
                    "token": " ignore",
                    "after": " the pain",
                    "activation": 3.5,
                }
            ],
            "logit_lens": {"promoted": [[" skip", 1.0]], "suppressed": [[" call", -1.0]]},
        },
    }
    with OpenAIServer() as server:
        server.push(reply_text('"Harmful advice to neglect symptoms"'))
        client = LLMClient(model="labeller-1", api_key="k", base_url=server.base_url)
        labeller = FeatureLabeller(client, tmp_path / "labels")
        assert labeller.label(card) == "Harmful advice to neglect symptoms"
        assert labeller.label(card) == "Harmful advice to neglect symptoms"  # cached
        assert len(server.requests) == 1
        prompt = server.requests[0]["messages"][0]["content"]
        assert "You should<< ignore>> the pain" in prompt and "' skip'" in prompt
        never_active = {"name": "L0 #1", "adapted": {**card["adapted"], "contexts": []}}
        assert labeller.label(never_active) is None and len(server.requests) == 1


@pytest.mark.parametrize("activation", ["topk", "relu"])
def test_active_entries_equal_the_transcoders_dense_encode(activation):
    """The TopK fast path reads the same (row, position, feature, value) entries, in the same
    order, as scanning the transcoder's own dense ``encode``."""
    from circuit_tracer.transcoder.activation_functions import TopK
    from circuit_tracer.transcoder.single_layer_transcoder import SingleLayerTranscoder

    from em_circuits.models.transcoders import active_entries

    torch.manual_seed(0)
    function = TopK(5) if activation == "topk" else torch.nn.ReLU()
    transcoder = SingleLayerTranscoder(
        16, 64, function, 0, device=torch.device("cpu"), dtype=torch.float32
    )
    with torch.no_grad():
        for param in transcoder.parameters():
            param.normal_()
    inputs = torch.randn(3, 7, 16)
    valid = torch.ones(3, 7, dtype=torch.bool)
    valid[:, 0] = False
    valid[2, 5:] = False
    rows, positions, features, values = active_entries(transcoder, inputs, valid)
    dense = transcoder.encode(inputs).masked_fill(~valid[..., None], 0)
    want = torch.nonzero(dense > 0).tolist()
    got = torch.stack([rows, positions, features], 1).tolist()
    assert sorted(got) == want
    assert [g[:2] for g in got] == sorted(g[:2] for g in got)  # (row, position) order
    torch.testing.assert_close(values, dense[rows, positions, features])


@pytest.mark.slow
def test_cards_on_demand_for_any_feature_and_a_one_line_error(reference, micro_organism, capsys):
    """`em-circuits features LAYER:FEATURE` prints the card of any feature, from the run's
    cached index; a feature outside the transcoders is one line naming it and the ranges."""
    from micro_flags import model_args

    from em_circuits.cli.main import main
    from em_circuits.interpret.cards import feature_name

    flags = [*model_args(micro_organism), "--results-dir", str(reference), "--corpus-docs", "48"]
    assert main(["features", "1:3", "0:5", "--json", *flags]) == 0
    cards = json.loads(capsys.readouterr().out)
    assert [c["name"] for c in cards] == [feature_name(1, 3), feature_name(0, 5)]
    for card in cards:
        for role in ("base", "adapted"):
            assert card[role]["logit_lens"]["promoted"]
            assert card[role]["pivotal_prompts"]["prompts"] > 0  # the run's graphs
    assert main(["features", "1:99999", *flags]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: feature 1:99999 does not exist")


def test_feature_cards_print_as_terminal_text_or_markdown(micro_organism, tmp_path, capsys):
    """`em-circuits features L:F` prints plain text (no Markdown marks) with the viewer link;
    --markdown prints the Markdown."""
    from micro_flags import model_args

    from em_circuits.cli.main import main
    from em_circuits.core.naming import viewer_link
    from em_circuits.interpret.cards import feature_name

    results = tmp_path / "results"
    results.mkdir()
    flags = [*model_args(micro_organism), "--results-dir", str(results), "--corpus-docs", "8"]
    link = viewer_link(feature=(1, 3), diff=True)
    assert main(["features", "1:3", *flags]) == 0
    text = capsys.readouterr().out
    lines = text.splitlines()
    assert lines[0].startswith(feature_name(1, 3)) and set(lines[1]) == {"-"}
    assert len(lines[1]) == len(lines[0])
    assert "`" not in text and "####" not in text and "**" not in text, text
    assert "promotes " in text and link in text
    assert main(["features", "1:3", "--markdown", *flags]) == 0
    markdown = capsys.readouterr().out
    assert markdown.startswith(f"#### {feature_name(1, 3)}") and "`" in markdown
    assert link in markdown


def test_markdown_tables_align_for_the_terminal():
    from em_circuits.interpret.terminal import markdown_for_terminal

    text = markdown_for_terminal(
        "## Top\n\n| feature | mean |\n|---|---:|\n| `L3 #1` | 0.25 |\n| **L10 #12345** | -1.5 |\n"
    )
    assert text.splitlines()[:2] == ["Top", "==="]
    rows = text.splitlines()[3:]
    assert rows[0].split() == ["feature", "mean"] and set(rows[1].replace(" ", "")) == {"-"}
    assert rows[2].startswith("L3 #1 ") and rows[3].startswith("[L10 #12345]")
    # the second column starts at one place in every row
    starts = [rows[0].index("mean"), rows[1].index("  -") + 2, rows[2].index("0.25")]
    assert len({*starts, rows[3].index("-1.5")}) == 1, rows
    assert markdown_for_terminal("**x**", colour=True) == "\033[1mx\033[0m"
