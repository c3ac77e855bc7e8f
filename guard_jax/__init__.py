"""guard_jax: GUARD (guaranteed generation from language models) in JAX.

    import guard_jax as gj

    a = gj.LM.load("embedded")                                  # the shipped base LM
    b = gj.constraints.from_spec("keyword:love", a.tokenizer)
    gold = gj.draw_gold(key, a, b, 20_000, max_new_tokens=30)   # samples of g = a·b / Z, drawn once
    p = gj.proposals.warm_start_dpg(a, b, gold, key=k2, start=gj.proposals.sft(a, b, gold, key=k1))
    ev = gj.evaluate_proposal(k3, gold, a, p.lm, b, 4_000)      # AR, KL(g||a'), KL(g||g') with CIs
    out = gj.guard_sample(k4, p.lm, b, 100, max_new_tokens=30)  # 100 samples that all satisfy b

Names are loaded on first use, so `import guard_jax` stays light.
"""

from __future__ import annotations

import importlib

_NAMES = {
    "LM": "guard_jax.lm", "common_prompt_length": "guard_jax.lm",
    "draw": "guard_jax.sampling", "score": "guard_jax.sampling", "Draws": "guard_jax.sampling",
    "guard_sample": "guard_jax.rejection", "GuardResult": "guard_jax.rejection",
    "Gold": "guard_jax.evaluate", "draw_gold": "guard_jax.evaluate", "Evaluation": "guard_jax.evaluate",
    "evaluate_proposal": "guard_jax.evaluate", "monte_carlo": "guard_jax.evaluate", "CurvePoint": "guard_jax.evaluate",
    "MonteCarloEvaluator": "guard_jax.evaluate", "ExactEvaluator": "guard_jax.evaluate",
    "Proposal": "guard_jax.proposals", "RECIPES": "guard_jax.proposals", "register": "guard_jax.proposals",
    "Estimate": "guard_jax.estimators",
    "diversity_report": "guard_jax.metrics.diversity", "common_set_size": "guard_jax.metrics.diversity",
    "self_bleu": "guard_jax.metrics.diversity", "self_bleu_sets": "guard_jax.metrics.diversity",
    "position_report": "guard_jax.metrics.position", "first_positions": "guard_jax.metrics.position",
}
_MODULES = ("config", "constraints", "estimators", "evaluate", "exact", "proposals", "rejection", "sampling", "metrics", "train",
            "decoding", "models", "parallel", "grammars", "samplers", "lora", "precision")

__all__ = sorted(_NAMES) + list(_MODULES)


def __getattr__(name: str):
    if name in _NAMES:
        value = getattr(importlib.import_module(_NAMES[name]), name)
    elif name in _MODULES:
        value = importlib.import_module(f"guard_jax.{name}")
    else:
        raise AttributeError(f"module 'guard_jax' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__():
    return __all__
