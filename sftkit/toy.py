"""An embedded, offline default: a toy language family and a tiny encoder pretrained on part of it.

Used by ``sftkit demo`` and by the tests; never a substitute for real data in benchmarks.

How each piece maps onto the real setting (XLM-R, Indonesian → Acehnese / Balinese):

- **Concepts and grammar.** A fixed set of concepts, some positive, some negative, the rest neutral. A
  sentence is a walk through the concepts: each is usually followed by one of two fixed successors,
  the same in every language (the languages of a family share most of their syntax and semantics), so
  a masked LM has structure to learn, and structure to align languages by.
- **The family** (:func:`make_family`). The source ``src`` (Indonesian, the task's labelled language),
  three relatives ``rel1``–``rel3`` (Malay, Javanese, Sundanese…), each keeping half of the source's
  words, and the targets ``ace`` and ``ban``. A target word is the source's (``ace`` 45 %, ``ban`` 30 %),
  else a relative's (30 %, 35 %), else the target's own (25 %, 35 %): most of a target's vocabulary is
  known to θ0 through its relatives, the rest only from the little target text in its pretraining.
- **θ0** (:func:`pretrain_base`): a tiny XLM-R-shaped encoder, masked-LM pretrained on blocks of the
  source and its relatives, with a little text of each target (1 % of the mix: XLM-R's data has no
  Acehnese corpus, only what web text in its relatives carries), its vocabulary covering the whole
  family. One world and one θ0 (world seed 0), as there is one XLM-R; it ships with sftkit
  (``sftkit/toy_base``, ≈ 0.5 MB), because its pretraining (minutes on one thread) would not fit in a
  first run. ``python -m sftkit.toy`` rebuilds it bit for bit on one thread; ``build.json`` records
  what it was built from and its held-out MLM loss per language (low on the pretraining languages, high
  on the targets).
- **The task**: sentiment, the sign of (positive − negative) concepts in a sentence, ``neutral`` when
  they balance (SMSA / NusaX sentiment). Labelled data exist in the source only; the targets are
  evaluated zero-shot. A demo's ``--seed`` draws its data and trains with that seed, on the same θ0.
- **Language SFTs** are trained on raw target text (MLM), the task SFT on labelled source text on top of
  the source's language SFT, exactly as on real data. A language SFT's job is the real one: teach θ0 the
  target's own words, which θ0 barely saw (their embeddings' cosine with their source translations' is 0.36
  in θ0, 0.60 for the relatives' words θ0 learnt; the demo's language SFTs take it to 0.56).

:func:`make_languages` is the older, single-level world (targets borrow from the source only) that the
tests use with a random θ0 (:func:`build_tiny_base`) when only the machinery is under test.
"""

from __future__ import annotations

import csv
import hashlib
import json
import random
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

LABELS = ("negative", "neutral", "positive")
SOURCE_LANGUAGE = "src"
DEFAULT_LANGUAGES = {"src": 0.0, "ace": 0.55, "ban": 0.35}
_SYLLABLES = [c + v for c in "bcdfghjklmnprstwz" for v in "aeiou"]
_N_CONCEPTS = 120
_N_POLAR = 20  # concepts 0..19 are positive, 20..39 negative, the rest neutral
# The grammar: the next concept is one of the current one's two successors with probability 0.9. A masked
# word is then nearly decided by its neighbours (≈ 1.4 nats given the left one, against ≈ 4.6 for a
# unigram), so θ0 must learn word order to predict it, and a concept's words in different languages share
# their contexts: what lets pretraining align the languages. With the weaker grammar of earlier versions
# (0.8, three successors) the tiny θ0 never learnt word order at all: its held-out loss stopped at the
# per-language unigram's (≈ 4.3), no attention head looked at a neighbour, and a non-cognate word's nearest
# source word was its translation for 0–5 % of words; now for 100 % (relatives) and 86 % (ace) (issue 18).
_FOLLOW = 0.9
_N_SUCCESSORS = 2
# The family of ``make_family``: θ0 is pretrained mostly on the source and its relatives; a target's words come
# from the source (first share), from a relative (second share), or are its own (the rest).
WORLD_SEED = 0  # one world, as there is one XLM-R: a demo's --seed varies its data and training, not θ0
RELATIVES = ("rel1", "rel2", "rel3")
RELATIVE_COGNATE_RATE = 0.5
TARGETS = {"ace": (0.45, 0.30), "ban": (0.30, 0.35)}
# θ0's pretraining (``pretrain_base``): 8 000 steps of 64 blocks of 16 tokens (a sentence or so each, as the
# demo's SFTs see them: nothing there is longer), ≈ 30 passes over the mix, at a peak lr of 3e-3 (at 1e-3 the
# tiny model stays on its unigram plateau). The model's sizes and the vocabulary sample are here too, so
# that changing any of them asks for a rebuild (world_digest). One thread, ≈ 10 minutes.
PRETRAINING = {
    "steps": 8000,
    "batch_size": 64,
    "block": 16,
    "lr": 3e-3,
    "sentences_per_language": 5000,
    "sentences_per_target": 100,  # rare, as Acehnese in XLM-R's pretraining data: 1 % of the mix
    "vocabulary_sentences": 1000,  # per language, for the word-level vocabulary (every word of the family)
    "hidden_size": 64,
    "layers": 2,
    "heads": 4,
}
TOY_BASE = Path(__file__).resolve().parent / "toy_base"
BUILD_RECORD = "build.json"
_SUCCESSORS = tuple(
    tuple(random.Random(f"successors-{c}").sample(range(_N_CONCEPTS), _N_SUCCESSORS)) for c in range(_N_CONCEPTS)
)


@dataclass(frozen=True)
class ToyLanguage:
    """A made-up language: one spelling per concept."""

    code: str
    words: tuple[str, ...]

    def sentence(self, rng: random.Random, length: int) -> tuple[str, str]:
        concepts = [rng.randrange(_N_CONCEPTS)]
        while len(concepts) < length:
            previous = concepts[-1]
            follow = rng.random() < _FOLLOW
            concepts.append(rng.choice(_SUCCESSORS[previous]) if follow else rng.randrange(_N_CONCEPTS))
        score = sum(1 for c in concepts if c < _N_POLAR) - sum(1 for c in concepts if _N_POLAR <= c < 2 * _N_POLAR)
        label = "positive" if score > 0 else "negative" if score < 0 else "neutral"
        return " ".join(self.words[c] for c in concepts), label


def _word(rng: random.Random) -> str:
    return "".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(2, 3)))


def make_languages(languages: dict[str, float] | None = None, seed: int = 0) -> dict[str, ToyLanguage]:
    """Languages by code → cognate rate with the source language (the source itself has 0)."""
    languages = dict(languages or DEFAULT_LANGUAGES)
    source_words = _source_words(seed)
    made = {SOURCE_LANGUAGE: ToyLanguage(SOURCE_LANGUAGE, source_words)}
    for code, cognate_rate in languages.items():
        if code == SOURCE_LANGUAGE:
            continue
        made[code] = ToyLanguage(code, _cognates(source_words, cognate_rate, random.Random(f"{seed}-{code}")))
    return made


def _cognates(source_words: tuple[str, ...], rate: float, rng: random.Random) -> tuple[str, ...]:
    """Each concept keeps the source's word with probability ``rate``, else gets a word of its own."""
    return tuple(word if rng.random() < rate else _word(rng) for word in source_words)


def _source_words(seed: int) -> tuple[str, ...]:
    rng = random.Random(f"{seed}-{SOURCE_LANGUAGE}")
    return tuple(_word(rng) for _ in range(_N_CONCEPTS))


@dataclass(frozen=True)
class Family:
    """A language family as θ0 sees it: the languages it was pretrained on, and the targets it never saw."""

    pretraining: dict[str, ToyLanguage]  # the source first, then its relatives
    targets: dict[str, ToyLanguage]

    @property
    def languages(self) -> dict[str, ToyLanguage]:
        return {**self.pretraining, **self.targets}


def make_family(seed: int = WORLD_SEED) -> Family:
    """The source, three relatives (each keeps ``RELATIVE_COGNATE_RATE`` of the source's words) and the targets.

    A target word is the source's (``TARGETS[code][0]``), else a relative's (``[1]``, that relative's own
    word or its cognate), else the target's own (the rest): words θ0 has never seen in any language.
    """
    source_words = _source_words(seed)
    pretraining = {SOURCE_LANGUAGE: ToyLanguage(SOURCE_LANGUAGE, source_words)}
    for code in RELATIVES:
        rng = random.Random(f"{seed}-{code}")
        pretraining[code] = ToyLanguage(code, _cognates(source_words, RELATIVE_COGNATE_RATE, rng))
    relatives = [pretraining[code] for code in RELATIVES]
    targets = {}
    for code, (from_source, from_relatives) in TARGETS.items():
        rng = random.Random(f"{seed}-{code}")
        words = []
        for concept, source_word in enumerate(source_words):
            draw = rng.random()
            if draw < from_source:
                words.append(source_word)
            elif draw < from_source + from_relatives:
                words.append(rng.choice(relatives).words[concept])
            else:
                words.append(_word(rng))
        targets[code] = ToyLanguage(code, tuple(words))
    return Family(pretraining, targets)


def labelled(language: ToyLanguage, n: int, seed: int = 0) -> list[tuple[str, str]]:
    """``n`` (text, label) pairs, 4 to 12 words each."""
    rng = random.Random(f"{seed}-{language.code}-labelled")
    return [language.sentence(rng, rng.randint(4, 12)) for _ in range(n)]


def corpus(language: ToyLanguage, n: int, seed: int = 0) -> list[str]:
    """``n`` raw sentences, as for a language SFT's MLM corpus."""
    rng = random.Random(f"{seed}-{language.code}-corpus")
    return [language.sentence(rng, rng.randint(4, 16))[0] for _ in range(n)]


def write_corpus(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def write_labelled_csv(path: Path, rows: list[tuple[str, str]]) -> Path:
    """NusaX-style CSV: ``id,text,label``."""
    with path.open("w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["id", "text", "label"])
        writer.writerows((i, text, label) for i, (text, label) in enumerate(rows))
    return path


def build_tiny_base(
    out_dir: str | Path,
    texts: list[str],
    hidden_size: int = 64,
    layers: int = 2,
    heads: int = 4,
    vocab_size: int = 600,
    seed: int = 0,
) -> Path:
    """Save an XLM-R-shaped encoder with random weights and a WordPiece tokenizer built from ``texts``.

    The directory loads with ``AutoModelForMaskedLM`` / ``AutoModelForSequenceClassification`` /
    ``AutoTokenizer.from_pretrained`` like any Hub checkpoint.
    """
    # The toy world is plain Python; only building the model needs these (the tests build a few worlds).
    import torch
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast, XLMRobertaConfig, XLMRobertaForMaskedLM

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    specials = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
    tokenizer = Tokenizer(models.WordPiece(_wordpiece_vocab(texts, vocab_size, specials), unk_token="<unk>"))
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.post_processor = processors.RobertaProcessing(("</s>", 2), ("<s>", 0))
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<s>",
        eos_token="</s>",
        sep_token="</s>",
        cls_token="<s>",
        unk_token="<unk>",
        pad_token="<pad>",
        mask_token="<mask>",
        model_max_length=128,
    )
    fast.save_pretrained(out)
    config = XLMRobertaConfig(
        vocab_size=tokenizer.get_vocab_size(),
        hidden_size=hidden_size,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=hidden_size * 4,
        max_position_embeddings=130,
        pad_token_id=1,
        bos_token_id=0,
        eos_token_id=2,
    )
    torch.manual_seed(seed)
    XLMRobertaForMaskedLM(config).save_pretrained(out)
    return out


def world_corpora() -> dict[str, list[str]]:
    """The text θ0's pretraining sees (world seed): plenty of the source and its relatives, a little of each
    target."""
    family = make_family()
    sizes = {code: PRETRAINING["sentences_per_language"] for code in family.pretraining}
    sizes |= {code: PRETRAINING["sentences_per_target"] for code in family.targets}
    return {code: corpus(language, sizes[code], WORLD_SEED) for code, language in family.languages.items()}


def pretrain_base(out_dir: str | Path, steps: int = PRETRAINING["steps"]) -> Path:
    """Build θ0 as a multilingual encoder is made: :func:`build_tiny_base`, then masked-LM pretraining (tied
    decoder, as XLM-R's) on plenty of the source and its relatives and a little of each target (1 % of the
    mix, as Acehnese in XLM-R's data), so a target's own words are known to θ0, but poorly. Deterministic on
    one thread; writes ``build.json``. Dropout is off while pretraining (it slows the tiny model's escape
    from its unigram plateau) and 0.1 in the saved config, XLM-R's fine-tuning value.
    """
    import torch
    from transformers import (
        AutoTokenizer,
        DataCollatorForLanguageModeling,
        XLMRobertaForMaskedLM,
        get_linear_schedule_with_warmup,
    )

    from sftkit.training.features import tokenize_corpus

    family, corpora = make_family(), world_corpora()
    # The vocabulary covers every word of the family, as XLM-R's covers Acehnese through its relatives.
    vocabulary = [
        text
        for language in family.languages.values()
        for text in corpus(language, PRETRAINING["vocabulary_sentences"], WORLD_SEED)
    ]
    sizes = {key: PRETRAINING[key] for key in ("hidden_size", "layers", "heads")}
    out = build_tiny_base(out_dir, vocabulary, seed=WORLD_SEED, **sizes)
    tokenizer = AutoTokenizer.from_pretrained(out)
    model = XLMRobertaForMaskedLM.from_pretrained(out, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    # Blocks of contiguous text, one language at a time, as XLM-R's pretraining and as the trainer feeds
    # language SFTs (tokenize_corpus): every position of a block is trained, not only a sentence's first few.
    blocks = [
        block["input_ids"]
        for texts in corpora.values()
        for block in tokenize_corpus(tokenizer, texts, PRETRAINING["block"])
    ]
    collate = DataCollatorForLanguageModeling(tokenizer, mlm_probability=0.15, seed=WORLD_SEED)
    optimizer = torch.optim.AdamW(model.parameters(), lr=PRETRAINING["lr"], weight_decay=0.01)
    schedule = get_linear_schedule_with_warmup(optimizer, steps // 20, steps)
    order = random.Random(f"{WORLD_SEED}-pretraining")
    torch.manual_seed(WORLD_SEED)
    model.train()
    for _ in range(steps):
        batch = collate([{"input_ids": ids} for ids in order.sample(blocks, PRETRAINING["batch_size"])])
        model(**batch).loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
    model.config.hidden_dropout_prob = model.config.attention_probs_dropout_prob = 0.1
    model.save_pretrained(out)
    build = {
        "world": world_digest(),
        "steps": steps,
        "held_out_mlm_loss": _held_out_mlm_loss(model.eval(), tokenizer),
        "model_sha256": hashlib.sha256((out / "model.safetensors").read_bytes()).hexdigest(),
    }
    (out / BUILD_RECORD).write_text(json.dumps(build, indent=1, sort_keys=True) + "\n")
    return out


def world_digest() -> str:
    """Everything that decides the shipped θ0: the family's words, the pretraining settings, the code's
    sizes. A change to any of them makes ``tests/test_toy.py`` ask for a rebuild (``python -m sftkit.toy``)."""
    family = make_family()
    world = {
        "languages": {code: language.words for code, language in family.languages.items()},
        "pretraining": PRETRAINING,
        "successors": _SUCCESSORS,
        "follow": _FOLLOW,
    }
    return hashlib.sha256(json.dumps(world, sort_keys=True).encode()).hexdigest()


def _held_out_mlm_loss(model: Any, tokenizer: Any) -> dict[str, float]:
    """Masked-LM loss per language on sentences pretraining never saw: low on the pretraining languages,
    high on the targets, as XLM-R's on Acehnese."""
    import torch
    from transformers import DataCollatorForLanguageModeling

    from sftkit.training.features import tokenize_corpus

    collate = DataCollatorForLanguageModeling(tokenizer, mlm_probability=0.15, seed=WORLD_SEED + 1)
    losses = {}
    for code, language in make_family().languages.items():
        blocks = tokenize_corpus(tokenizer, corpus(language, 200, WORLD_SEED + 100), PRETRAINING["block"])
        with torch.no_grad():
            losses[code] = round(model(**collate([{"input_ids": b["input_ids"]} for b in blocks])).loss.item(), 3)
    return losses


def pretrained_base() -> Path:
    """The shipped θ0 (``sftkit/toy_base``), built by ``python -m sftkit.toy``."""
    if not (TOY_BASE / "model.safetensors").is_file():
        raise FileNotFoundError(f"the toy θ0 is missing from {TOY_BASE}: rebuild it with python -m sftkit.toy")
    return TOY_BASE


def _wordpiece_vocab(texts: list[str], size: int, specials: list[str]) -> dict[str, int]:
    """Special tokens, every character (word-initial and ``##`` continuation), then the most frequent words.

    Built here rather than by ``tokenizers``' WordPiece trainer, whose merges tie-break in hash order and
    so differ from process to process: the same seed must give the same toy model, and the same demo.
    """
    words = Counter(word for text in texts for word in re.findall(r"\w+|[^\w\s]+", text.lower()))
    characters = sorted({character for word in words for character in word})
    tokens = [*specials, *characters, *(f"##{character}" for character in characters)]
    known = set(tokens)
    by_frequency = sorted((word for word in words if word not in known), key=lambda word: (-words[word], word))
    tokens += by_frequency[: max(0, size - len(tokens))]
    return {token: index for index, token in enumerate(tokens)}


if __name__ == "__main__":  # python -m sftkit.toy: rebuild the shipped θ0 (minutes on one CPU thread)
    import torch

    torch.set_num_threads(1)  # one thread: the build is bit-reproducible and tiny matrices gain nothing from more
    print((pretrain_base(TOY_BASE) / BUILD_RECORD).read_text())
