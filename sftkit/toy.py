"""An embedded, offline default: a toy multilingual world and a tiny encoder built from a config.

Used by ``sftkit demo`` and by the tests; never a substitute for real data in benchmarks.

The toy world: a fixed set of concepts, some positive, some negative, the rest neutral. Every
language spells each concept with its own made-up word; a ``cognate_rate`` share of the spellings is
borrowed from the source language (``src``), so related languages share some surface forms, as
Acehnese and Indonesian do. A sentence is a walk through the concepts: each concept is usually
followed by one of a few fixed successors, the same in every language, so there is structure for a
masked LM to learn and to align across languages. Its sentiment label is the sign of
(positive − negative) concepts in it, ``neutral`` when they balance.
"""

from __future__ import annotations

import csv
import random
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

LABELS = ("negative", "neutral", "positive")
SOURCE_LANGUAGE = "src"
DEFAULT_LANGUAGES = {"src": 0.0, "ace": 0.55, "ban": 0.35}
_SYLLABLES = [c + v for c in "bcdfghjklmnprstwz" for v in "aeiou"]
_N_CONCEPTS = 120
_N_POLAR = 20  # concepts 0..19 are positive, 20..39 negative, the rest neutral
_FOLLOW = 0.8  # probability that the next concept is one of the current one's successors
_SUCCESSORS = tuple(tuple(random.Random(f"successors-{c}").sample(range(_N_CONCEPTS), 3)) for c in range(_N_CONCEPTS))


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
    source_rng = random.Random(f"{seed}-{SOURCE_LANGUAGE}")
    source_words = tuple(_word(source_rng) for _ in range(_N_CONCEPTS))
    made = {SOURCE_LANGUAGE: ToyLanguage(SOURCE_LANGUAGE, source_words)}
    for code, cognate_rate in languages.items():
        if code == SOURCE_LANGUAGE:
            continue
        rng = random.Random(f"{seed}-{code}")
        words = tuple(w if rng.random() < cognate_rate else _word(rng) for w in source_words)
        made[code] = ToyLanguage(code, words)
    return made


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
