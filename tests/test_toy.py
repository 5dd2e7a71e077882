"""The toy world's θ0: pretrained like a multilingual encoder, shipped, and reproducible from the code."""

from __future__ import annotations

import hashlib
import json
import math

from sftkit import toy


def test_family_targets_share_words_with_pretraining_languages_and_have_their_own():
    family = toy.make_family()
    assert list(family.pretraining) == [toy.SOURCE_LANGUAGE, *toy.RELATIVES]
    seen = {word for language in family.pretraining.values() for word in language.words}
    source = set(family.pretraining[toy.SOURCE_LANGUAGE].words)
    for code, (from_source, from_relatives) in toy.TARGETS.items():
        words = family.targets[code].words
        shared_with_source = sum(word in source for word in words) / len(words)
        unseen = sum(word not in seen for word in words) / len(words)
        # Shares as drawn (120 concepts: within ±0.12 of the expected share; a relative's word is the source's
        # when that relative kept it), and a part no pretraining language has.
        expected_with_source = from_source + from_relatives * toy.RELATIVE_COGNATE_RATE
        assert abs(shared_with_source - expected_with_source) < 0.12
        assert abs(unseen - (1 - from_source - from_relatives)) < 0.12
    assert toy.make_family().languages == family.languages  # one world


def test_pretraining_is_deterministic(tmp_path):
    """Two builds of the same settings give the same bytes: the shipped θ0 is reproducible by its script."""
    first = toy.pretrain_base(tmp_path / "a", steps=8)
    second = toy.pretrain_base(tmp_path / "b", steps=8)
    assert (first / "model.safetensors").read_bytes() == (second / "model.safetensors").read_bytes()
    record = json.loads((first / toy.BUILD_RECORD).read_text())
    assert record == json.loads((second / toy.BUILD_RECORD).read_text())
    assert record["steps"] == 8 and record["world"] == toy.world_digest()


def test_shipped_base_is_the_current_world_pretrained():
    """The shipped θ0 was built from today's toy world and settings (else: python -m sftkit.toy), its weights
    are the ones it recorded, and it learnt the pretraining languages far better than the unseen targets."""
    base = toy.pretrained_base()
    record = json.loads((base / toy.BUILD_RECORD).read_text())
    assert record["world"] == toy.world_digest(), "the toy world changed: rebuild θ0 with python -m sftkit.toy"
    assert record["steps"] == toy.PRETRAINING["steps"]
    assert record["model_sha256"] == hashlib.sha256((base / "model.safetensors").read_bytes()).hexdigest()
    loss = record["held_out_mlm_loss"]
    pretrained = [loss[code] for code in (toy.SOURCE_LANGUAGE, *toy.RELATIVES)]
    vocabulary = json.loads((base / "config.json").read_text())["vocab_size"]
    assert max(pretrained) < math.log(vocabulary) - 1.5  # a uniform guess scores ln(vocabulary)
    assert min(loss[code] for code in toy.TARGETS) > max(pretrained) + 0.5  # the targets: rare in pretraining


def test_shipped_base_learnt_word_order_and_aligns_the_family():
    """What makes θ0 a fair miniature of a multilingual encoder: it predicts a masked word from its neighbours
    (the grammar), and a concept's words in different languages get nearby embeddings, so that a word of a
    relative, or of a target, finds its source translation as its nearest source word. The θ0 shipped before
    issue 18's rebuild did neither (held-out loss at the per-language unigram's ≈ 4.3, retrieval ≈ 0)."""
    import torch
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    base = toy.pretrained_base()
    record = json.loads((base / toy.BUILD_RECORD).read_text())
    family = toy.make_family()
    assert max(record["held_out_mlm_loss"][code] for code in family.pretraining) < 1.5  # a unigram scores ≈ 4.6
    tokenizer, model = AutoTokenizer.from_pretrained(base), AutoModelForMaskedLM.from_pretrained(base)
    embeddings = model.get_input_embeddings().weight.detach()
    embeddings = torch.nn.functional.normalize(embeddings - embeddings.mean(0), dim=1)
    source = family.pretraining[toy.SOURCE_LANGUAGE].words
    floors = dict.fromkeys(toy.RELATIVES, 0.9) | dict.fromkeys(toy.TARGETS, 0.6)  # targets: 1 % of pretraining
    for code, floor in floors.items():
        pairs = [(a, b) for a, b in zip(source, family.languages[code].words, strict=True) if a != b]
        source_ids = tokenizer.convert_tokens_to_ids([a for a, _ in pairs])
        own_ids = tokenizer.convert_tokens_to_ids([b for _, b in pairs])
        similarity = embeddings[own_ids] @ embeddings[source_ids].T  # each non-cognate word against the source's
        retrieval = (similarity.argmax(1) == torch.arange(len(pairs))).float().mean().item()
        assert retrieval >= floor, f"{code}: {retrieval:.2f} of its words find their source translation"
