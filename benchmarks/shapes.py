"""The yardstick shape for performance work: XLM-R base (278 M parameters), random weights.

``XLMRobertaConfig()`` alone defaults to a BERT-size vocabulary of 30 522 (≈ 86 M parameters); the
real ``xlm-roberta-base`` config.json has 250 002 tokens and 514 positions, so these are set here.
"""

from __future__ import annotations


def xlmr_base_config(quick: bool = False):
    """XLM-R base's configuration, or a small same-family shape for ``--quick`` runs."""
    from transformers import XLMRobertaConfig

    if quick:
        return XLMRobertaConfig(
            vocab_size=30000, hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024
        )
    return XLMRobertaConfig(
        vocab_size=250002,
        max_position_embeddings=514,
        type_vocab_size=1,
        pad_token_id=1,
        bos_token_id=0,
        eos_token_id=2,
    )
