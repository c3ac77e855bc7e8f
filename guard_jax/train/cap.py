"""CAP: the proposal a'(y) = a(y | CAP prompt + context), the base model with a constraint-aware prompt.

For text models, a' is `a.with_prefix(cap_prompt)` (guard_jax.lm.LM): the same model and params, conditioned
on BOS + the CAP prompt + a's context; a scores y on the context alone. For token-id prompts (toy ARMs),
`a.with_prompt(cap_context(...))`. DPG warm-started from CAP is an off-policy `DPG` with that LM as `proposal`.
"""

from __future__ import annotations


def cap_context(bos_id: int, cap_tokens: list[int], context_tokens: list[int] = ()) -> list[int]:
    """BOS, then the CAP prompt, then the context: the prompt a' conditions on."""
    if not cap_tokens:
        raise ValueError("cap_tokens must hold the constraint-aware prompt (got none)")
    return [bos_id, *cap_tokens, *context_tokens]
