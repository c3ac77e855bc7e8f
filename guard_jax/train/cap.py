"""CAP: the proposal a'(y) = a(y | CAP prompt + context), the base model with a constraint-aware prompt.

Sampling uses the prompt; a scores y on the context alone and a' with the prompt, which is what
`guard_jax.evaluate.monte_carlo` does with the two `LM`s returned here. For DPG warm-started from CAP, pass
`proposal_context=cap_context(...)` to an off-policy `DPG`.
"""

from __future__ import annotations

from guard_jax.evaluate import LM
from guard_jax.models.base import ARM, Params


def cap_context(bos_id: int, cap_tokens: list[int], context_tokens: list[int] = ()) -> list[int]:
    """BOS, then the CAP prompt, then the context: the prompt a' conditions on."""
    if not cap_tokens:
        raise ValueError("cap_tokens must hold the constraint-aware prompt (got none)")
    return [bos_id, *cap_tokens, *context_tokens]


def cap_pair(model: ARM, params: Params, tokenizer, cap_prompt: str, context: str = "") -> tuple[LM, LM]:
    """(a, a') for text models: a conditions on BOS + context, a' on BOS + cap_prompt + context."""
    if not cap_prompt:
        raise ValueError("cap_prompt must be a non-empty constraint-aware prompt, e.g. \"Next sentence should contain 'amazing'.\\n\\n\"")
    return LM.from_text(model, params, tokenizer, context), LM.from_text(model, params, tokenizer, cap_prompt + context)
