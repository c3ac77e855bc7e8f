"""Baselines GUARD is compared with: masked (constrained) decoding and ASAp (grammar-aligned decoding)."""

from guard_jax.decoding.gcd import (
    MaskedSamples,
    MaskProvider,
    TokenAutomaton,
    check_feasible,
    exact_masked_log_prob,
    grammar_masked_sample,
    masked_sample,
    reachability_automaton,
    regex_automaton,
    unconstrained_automaton,
)

__all__ = [
    "MaskProvider",
    "MaskedSamples",
    "TokenAutomaton",
    "check_feasible",
    "exact_masked_log_prob",
    "grammar_masked_sample",
    "masked_sample",
    "reachability_automaton",
    "regex_automaton",
    "unconstrained_automaton",
]

from guard_jax.decoding.asap import Asap, AsapSamples  # noqa: E402

__all__ += ["Asap", "AsapSamples"]
