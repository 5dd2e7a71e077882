"""θ0: loading a base model with the head a job needs, and the head classes themselves.

A leaf shared by composition, training and interop, so none of them depends on another just to
load a model.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from sftkit.errors import BadInputError, BaseUnavailableError

HEADS = ("sequence-classification", "token-classification", "masked-lm", "none")
# Heads that classify with a label list (``id2label``): one label per text, or one tag per word (NER, POS).
CLASSIFIER_HEADS = ("sequence-classification", "token-classification")
_ARCHITECTURE_SUFFIXES = {
    "ForSequenceClassification": "sequence-classification",
    "ForTokenClassification": "token-classification",
    "ForMaskedLM": "masked-lm",
}


@contextmanager
def quiet_transformers():
    """Silence load reports and weight-loading bars: the fresh classifier they warn about is overwritten."""
    from transformers.utils import logging  # transformers loads in the functions that need a model (+0.6 s)

    previous, bars = logging.get_verbosity(), logging.is_progress_bar_enabled()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        logging.set_verbosity(previous)
        if bars:
            logging.enable_progress_bar()


# Seconds to wait for the Hub's answer about a base: a reachable Hub answers a HEAD request in well under this.
HUB_PROBE_TIMEOUT = 5.0
_OFFLINE_ADVICE = (
    "pass --base DIR (or set SFTKIT_BASE=DIR) to a local model directory, or fetch it once online into the "
    "Hugging Face cache, which HF_HUB_OFFLINE=1 then uses"
)


def local_files_only(base: str, revision: str | None = None) -> bool:
    """Whether θ0 must be read from the local Hugging Face cache; raises ``BaseUnavailableError`` when it
    cannot be read at all.

    Without this, transformers retries an unreachable Hub for about a minute per file (even for a cached
    base) and then fails without naming a local base or offline mode. One HEAD request without retries
    decides instead: a reachable Hub → normal loading; an unreachable one (or ``HF_HUB_OFFLINE``) → the
    cache if it holds the base, else one line saying how to work offline.
    """
    if Path(base).expanduser().is_dir():
        return False
    import httpx2  # huggingface_hub's HTTP client: its network errors reach us unwrapped
    from huggingface_hub import get_hf_file_metadata, hf_hub_url, is_offline_mode, try_to_load_from_cache
    from huggingface_hub.constants import ENDPOINT
    from huggingface_hub.errors import HfHubHTTPError, HFValidationError

    try:
        cached = isinstance(try_to_load_from_cache(base, "config.json", revision=revision), str)
    except HFValidationError:
        return False  # neither a directory nor a Hub id: from_pretrained says so
    if is_offline_mode():
        if cached:
            return True
        raise BaseUnavailableError(
            f"base model {base!r} is not a local directory and not in the Hugging Face cache, and HF_HUB_OFFLINE "
            f"is set: {_OFFLINE_ADVICE}"
        )
    try:
        get_hf_file_metadata(hf_hub_url(base, "config.json", revision=revision), timeout=HUB_PROBE_TIMEOUT)
    except httpx2.TransportError as exc:
        if cached:
            return True
        raise BaseUnavailableError(
            f"cannot reach the Hugging Face Hub ({ENDPOINT}: {type(exc).__name__}) to fetch base model {base!r}, "
            f"and it is not in the local cache: {_OFFLINE_ADVICE}"
        ) from exc
    except HfHubHTTPError:
        pass  # not found, gated, unauthorised…: from_pretrained reports them precisely
    return False


def head_class(head: str, labels: Sequence[str] | None = None) -> tuple[Any, dict[str, Any]]:
    """The transformers Auto class of a head and the config overrides it needs (a classifier's labels)."""
    from transformers import (  # see quiet_transformers
        AutoModel,
        AutoModelForMaskedLM,
        AutoModelForSequenceClassification,
        AutoModelForTokenClassification,
    )

    if head in CLASSIFIER_HEADS:
        labels = list(labels or [])
        overrides = {
            "num_labels": len(labels),
            "id2label": dict(enumerate(labels)),
            "label2id": {label: i for i, label in enumerate(labels)},
        }
        if head == "token-classification":
            return AutoModelForTokenClassification, overrides
        return AutoModelForSequenceClassification, overrides
    return (AutoModelForMaskedLM if head == "masked-lm" else AutoModel), {}


def head_of_architecture(architecture: str) -> str:
    """The head of a model class name (``XLMRobertaForTokenClassification`` → ``token-classification``)."""
    return next((head for suffix, head in _ARCHITECTURE_SUFFIXES.items() if architecture.endswith(suffix)), "none")


def load_base(base: str, head: str, labels: Sequence[str] | None = None, revision: str | None = None):
    """Load θ0 with the requested head from a Hub id or a local directory."""
    return load_base_reporting(base, head, labels, revision)[0]


def load_base_reporting(
    base: str, head: str, labels: Sequence[str] | None = None, revision: str | None = None
) -> tuple[Any, list[str]]:
    """``load_base`` plus the sorted names of the weights the checkpoint lacked (a freshly initialised head)."""
    auto, overrides = head_class(head, labels)
    if revision:
        overrides["revision"] = revision
    if local_files_only(base, revision):
        overrides["local_files_only"] = True
    try:
        with quiet_transformers():
            model, info = auto.from_pretrained(base, output_loading_info=True, **overrides)
    except (OSError, ValueError) as exc:
        raise BadInputError(f"cannot load base model {base!r}: {str(exc).splitlines()[0]}") from exc
    return model, sorted(info.get("missing_keys", ()))


def load_tokenizer(base: str, revision: str | None = None) -> Any:
    """θ0's tokenizer from a Hub id or a local directory."""
    kwargs: dict[str, Any] = {"revision": revision} if revision else {}
    if local_files_only(base, revision):
        kwargs["local_files_only"] = True
    try:
        with quiet_transformers():
            from transformers import AutoTokenizer  # see quiet_transformers

            return AutoTokenizer.from_pretrained(base, **kwargs)
    except (OSError, ValueError) as exc:
        raise BadInputError(f"cannot load the tokenizer of base model {base!r}: {str(exc).splitlines()[0]}") from exc


def untie_decoder(model: Any, freeze: bool) -> Any:
    """Give the MLM decoder its own copy of the word embeddings (frozen when ``freeze``); returns it.

    Language SFTs train with this decoder (the LT-SFT reference's ``--freeze_decoder``), so a masked-LM
    composition of one rebuilds it: θ0's embeddings in the decoder, θ0 + φ_L in the encoder. Returns None
    when the model has no output embedding; an already untied decoder keeps its values.
    """
    output = model.get_output_embeddings()
    if output is None:
        return None
    words = model.get_input_embeddings().weight
    if output.weight is words:
        output.weight = torch.nn.Parameter(words.detach().clone(), requires_grad=not freeze)
    elif freeze:
        output.weight.requires_grad_(False)
    model.config.tie_word_embeddings = False  # keeps a later tie_weights() (or a reload) from re-tying it
    return output.weight
