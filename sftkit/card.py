"""Model cards (README.md with YAML front matter) for SFT directories and composed models.

The front matter follows the Hugging Face Hub conventions so that pushed SFTs are searchable by
base model, language and the ``sftkit`` / ``deft-x`` tags.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence

from sftkit.metadata import SFTMetadata


def _front_matter(fields: dict[str, object]) -> str:
    lines = ["---"]
    for key, value in fields.items():
        if value is None or value == []:
            continue
        if isinstance(value, list):
            lines.append(f"{key}:")
            lines.extend(f"- {json.dumps(item)}" for item in value)
        else:
            lines.append(f"{key}: {json.dumps(value)}")
    lines.append("---")
    return "\n".join(lines) + "\n"


def _method_tag(method: str) -> str:
    return "deft-x" if method == "deftx" else method


def sft_model_card(metadata: SFTMetadata, num_entries: int) -> str:
    """Card of one SFT: what it adapts, how it was trained, how to compose it."""
    tags = ["sftkit", _method_tag(metadata.method), "sparse-fine-tuning", f"{metadata.kind}-sft"]
    front = _front_matter(
        {
            "base_model": metadata.base_model,
            "language": [metadata.language] if metadata.language else [],
            "library_name": "sftkit",
            "tags": tags,
        }
    )
    what = (
        f"language SFT for `{metadata.language}`"
        if metadata.kind == "language"
        else f"task SFT for `{metadata.task}`" + (f" (labels: {', '.join(metadata.labels)})" if metadata.labels else "")
    )
    density = f"{metadata.density:.4%}" if metadata.density is not None else "unknown"
    lines = [
        front,
        f"# {metadata.name} — {what}",
        "",
        f"A sparse fine-tuning of `{metadata.base_model}` made with "
        f"[sftkit](https://pypi.org/project/sftkit/) using **{metadata.method}**"
        f" (rank `{metadata.rank or 'none'}`, keep {metadata.keep}, k = {metadata.k}).",
        "",
        f"- tuned entries: {num_entries:,} (density {density} of the maskable encoder parameters)",
        f"- base fingerprint: `{metadata.base_fingerprint}`",
    ]
    if metadata.source_sft:
        lines.append(f"- trained on top of the source-language SFT `{metadata.source_sft.get('reference')}`")
    if metadata.metrics:
        lines.append(f"- metrics: `{json.dumps(metadata.metrics, sort_keys=True)}`")
    lines += [
        "",
        "## Use",
        "",
        "```bash",
        "sftkit import .  # or: sftkit pull owner/repo",
        "sftkit compose --task TASK --lang LANG -o model/",
        "```",
        "",
        "```python",
        "from sftkit.sft import SparseFineTuning",
        "sft = SparseFineTuning.load('path/to/this/directory')",
        "sft.apply(model)  # adds the sparse deltas in place",
        "```",
        "",
    ]
    return "\n".join(lines)


def _settings(merge: Mapping[str, object]) -> str:
    """``density 0.5, seed 0, normalised``: the merge settings the method uses."""
    shown = [f"density {merge['density']}"] if merge.get("density") is not None else []
    shown += [f"seed {merge['seed']}"] if merge.get("seed") is not None else []
    if merge.get("normalize") is not None:
        shown.append("normalised" if merge["normalize"] else "not normalised")
    return ", ".join(shown)


def _tuned(tuning: Mapping[str, object]) -> str:
    trials = tuning.get("trials")
    count = len(trials) if isinstance(trials, list) else 0
    return f"{count} trials, best {tuning.get('metric')} {tuning.get('score')}"


# The Hub pipeline of each head (``sftkit.base_model.HEADS``) and how the card shows it in use.
PIPELINES = {
    "sequence-classification": ("text-classification", "classify = pipeline('text-classification', model=PATH)"),
    "token-classification": (
        "token-classification",
        "tag = pipeline('token-classification', model=PATH, aggregation_strategy='simple')",
    ),
    "masked-lm": ("fill-mask", "fill = pipeline('fill-mask', model=PATH)"),
    "none": ("feature-extraction", "embed = pipeline('feature-extraction', model=PATH)"),
}


def composed_model_card(
    base_model: str,
    parts: Sequence[dict[str, object]],
    labels: Sequence[str] | None,
    head: str = "sequence-classification",
    merge: Mapping[str, object] | None = None,
    tuning: Mapping[str, object] | None = None,
) -> str:
    """Card of a composed model directory: which SFTs with which weights, how they were merged and, when
    ``--tune`` chose the weights, on what; its pipeline follows the head."""
    pipeline_tag, usage = PIPELINES.get(head, PIPELINES["none"])
    languages = sorted({str(p["language"]) for p in parts if p.get("language")})
    front = _front_matter(
        {
            "base_model": base_model,
            "language": languages,
            "library_name": "transformers",
            "pipeline_tag": pipeline_tag,
            "tags": ["sftkit", "deft-x", "sparse-fine-tuning", "composed"],
        }
    )
    method = (merge or {}).get("method", "sum")
    how = "θ = θ0 + Σ wᵢ φᵢ" if method == "sum" else f"θ = θ0 + {method} merge of the wᵢ φᵢ ({_settings(merge or {})})"
    lines = [front, f"# Composed model on `{base_model}`", "", f"{how}, with:", ""]
    lines += [
        f"- {p['kind']} SFT `{p.get('reference') or p.get('name')}` × {p['weight']} ({p['method']})" for p in parts
    ]
    if tuning:
        lines += ["", f"Weights chosen by `--tune` on `{tuning.get('dev')}` ({_tuned(tuning)})."]
    if labels and head in ("sequence-classification", "token-classification"):
        lines += ["", f"{'Tags' if head == 'token-classification' else 'Labels'}: {', '.join(labels)}."]
    lines += [
        "",
        "```python",
        "from transformers import pipeline",
        usage.replace("PATH", "'path/to/this/directory'"),
        "```",
        "",
    ]
    return "\n".join(lines)
