"""The other proposals guard_jax has, in the experiments' registry (imported by `experiments.proposals`).

- `l3m`: L3M (SFT on b-filtered samples of a + log barrier on E[b] >= threshold, mu annealed);
- `aux` / `aux_q`: the auxiliary value-head trainer; `aux` is the distilled policy p_theta, `aux_q` is
  q = a · sigmoid(R) itself (two forward passes per token), from the same training run;
- `rl` / `rl:BETA`: KL-regularised REINFORCE with reward b and coefficient beta (hp `beta`, or the suffix);
- `masked`: masked decoding of a as a proposal (no training), `sft_masked` / `sft_asap`: SFT on samples of
  masked decoding / of ASAp (b-filtered, as a check of the token automaton).

Masking needs the constraint as a full-match regex over the decoded text: hp `regex`, else derived from the
config's `constraint` spec (`keyword:W` -> `([\\s\\S]*[^A-Za-z0-9_])?W([^A-Za-z0-9_][\\s\\S]*)?`, i.e. `\\bW\\b`
with ASCII word characters; `regex:P` -> `[\\s\\S]*(P)[\\s\\S]*`, re.search's semantics). The automaton walks
each token's bytes (`guard_jax.grammars.token_bytes`), so multi-byte characters split across byte-level pieces
are matched exactly; training data are filtered by the task's own b.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np

from experiments.proposals import Builder, Proposal, _base_point, _filtered_draws, _sft, _share_optimizer, register
from guard_jax.decoding import Asap, TokenAutomaton, check_feasible, regex_automaton
from guard_jax.decoding.masked_arm import MaskedARM
from guard_jax.evaluate import LM
from guard_jax.grammars import token_bytes
from guard_jax.train.aux import AuxConfig, AuxTrainer
from guard_jax.train.l3m import L3M, L3MConfig
from guard_jax.train.rl import RL, RLConfig


def _minibatch(hp: dict) -> int | None:
    """train.<name>.minibatch: samples per gradient pass (None: all n_samples at once)."""
    return None if hp.get("minibatch") is None else int(hp["minibatch"])


def _seed(b: Builder) -> int:
    return int(b.setup.config.get("seed", 0))


def _context_lm(b: Builder, params) -> LM:
    return b.setup.lm(params, b.task.context)


@register("l3m")
def l3m(b: Builder, hp: dict) -> Proposal:
    """L3M from a: SFT data = b-filtered draws of a (as sft_a), one barrier E[b] >= threshold, mu from mu_start
    to mu_end over `steps`. Samples drawn: the SFT draws plus n_samples per step."""
    s = b.setup
    draws, batch = int(hp.get("draws", 100_000)), int(hp.get("batch_size", 16))
    tokens, lengths, kept = _filtered_draws(b, _context_lm(b, s.params), draws, "l3m")
    if kept < batch:
        raise ValueError(f"l3m: only {kept} of {draws:,} draws satisfied the constraint, fewer than train.l3m.batch_size={batch}; "
                         "raise train.l3m.draws or lower batch_size")
    steps = int(hp.get("steps", 10))
    cfg = L3MConfig(thresholds=(float(hp.get("threshold", 0.5)),), total_steps=steps, n_samples=int(hp.get("n_samples", 256)),
                    batch_size=batch, max_new_tokens=s.max_new_tokens, learning_rate=float(hp.get("learning_rate", 1e-4)),
                    mu_start=float(hp.get("mu_start", 1.0)), mu_end=float(hp.get("mu_end", 0.01)))
    trainer = _share_optimizer(L3M(s.model, tokens, lengths, b.task.constraint, cfg, context=s.ids(b.task.context), seed=_seed(b)),
                               cfg.learning_rate, 0)
    params, curve = b.train("l3m", trainer, s.params, steps, int(hp.get("eval_points", 3)), lambda k: draws + k * cfg.n_samples,
                            lambda p: _context_lm(b, p), start=_base_point(b), seed=_seed(b))
    return Proposal(_context_lm(b, params), draws + steps * cfg.n_samples, curve, str(b.run_dir("l3m") / "metrics.jsonl"))


def _zero_head(params):
    """The value head's start: a copy of a's params with the final layer norm's scale (GPT-2 `ln_f`) at 0, so
    R = 0 (q = a) while the features below still carry gradient; all zeros for other layouts."""
    if isinstance(params, dict) and isinstance(params.get("ln_f"), dict) and "scale" in params["ln_f"]:
        head = jax.tree.map(lambda x: x, params)
        head["ln_f"] = {**params["ln_f"], "scale": jnp.zeros_like(params["ln_f"]["scale"])}
        return head
    return jax.tree.map(jnp.zeros_like, params)


def _aux_run(b: Builder, hp: dict):
    """Train the value head and the distilled policy once (shared by `aux` and `aux_q`)."""
    if "aux" not in b.extra:
        s = b.setup
        cfg = AuxConfig(n_samples=int(hp.get("n_samples", 256)), max_new_tokens=s.max_new_tokens,
                        learning_rate=float(hp.get("learning_rate", 1e-4)), kl_weight=float(hp.get("kl_weight", 1.0)),
                        minibatch=_minibatch(hp))
        if cfg.kl_weight <= 0:
            raise ValueError("train.aux.kl_weight must be > 0 here: the `aux` proposal is the distilled policy")
        trainer = _share_optimizer(AuxTrainer(s.model, s.params, s.model, b.task.constraint, cfg, context=s.ids(b.task.context)),
                                   cfg.learning_rate, 0)
        steps = int(hp.get("steps", 10))
        params, curve = b.train("aux", trainer, {"head": _zero_head(s.params), "policy": s.params}, steps, int(hp.get("eval_points", 3)),
                                lambda k: k * cfg.n_samples, lambda p: _context_lm(b, p["policy"]), start=_base_point(b), seed=_seed(b))
        b.extra["aux"] = (trainer, params, curve, steps * cfg.n_samples)
    return b.extra["aux"]


@register("aux")
def aux(b: Builder, hp: dict) -> Proposal:
    """The policy p_theta distilled (per-token KL) from q = a · sigmoid(R), R trained by BCE on b of a's samples."""
    _, params, curve, n = _aux_run(b, hp)
    return Proposal(_context_lm(b, params["policy"]), n, curve, str(b.run_dir("aux") / "metrics.jsonl"))


@register("aux_q")
def aux_q(b: Builder, hp: dict) -> Proposal:
    """q = a · sigmoid(R) from the `aux` run (hp from train.aux). Its curve holds its start only (R = 0: q = a);
    the curve of that run follows the policy."""
    trainer, params, _, n = _aux_run(b, dict(b.setup.config.get("train", {}).get("aux", {})) | hp)
    lm = _context_lm(b, b.setup.params)
    model, q_params = trainer.proposal(trainer.init_state(params))
    return Proposal(LM(model, q_params, lm.prompt_1P, lm.mask_1P), n, [_base_point(b)], str(b.run_dir("aux") / "metrics.jsonl"))


@register("rl", param="beta")
def rl(b: Builder, hp: dict) -> Proposal:
    """KL-regularised REINFORCE from a, reward b, coefficient hp `beta` (default 0.1; `rl:BETA` sets it)."""
    s, name = b.setup, hp.get("name", "rl")
    cfg = RLConfig(beta=float(hp.get("beta", 0.1)), n_samples=int(hp.get("n_samples", 256)), max_new_tokens=s.max_new_tokens,
                   learning_rate=float(hp.get("learning_rate", 1e-4)), minibatch=_minibatch(hp))
    trainer = _share_optimizer(RL(s.model, s.params, b.task.constraint, cfg, context=s.ids(b.task.context)), cfg.learning_rate, 0)
    steps = int(hp.get("steps", 10))
    params, curve = b.train(name, trainer, s.params, steps, int(hp.get("eval_points", 3)), lambda k: k * cfg.n_samples,
                            lambda p: _context_lm(b, p), start=_base_point(b), seed=_seed(b))
    return Proposal(_context_lm(b, params), steps * cfg.n_samples, curve, str(b.run_dir(name) / "metrics.jsonl"))


# ---- masking and ASAp ----


def fullmatch_regex(config: dict, hp: dict) -> str:
    """The task's b as a full-match regex over the decoded text (see the module docstring)."""
    if hp.get("regex"):
        return str(hp["regex"])
    word = config.get("keyword", "")
    spec = config.get("constraint", "keyword:{keyword}").format(keyword=word, Keyword=word.capitalize())
    kind, _, arg = spec.partition(":")
    if " & " not in spec and kind == "keyword" and arg:
        return rf"([\s\S]*[^A-Za-z0-9_])?{re.escape(arg)}([^A-Za-z0-9_][\s\S]*)?"
    if " & " not in spec and kind == "regex" and arg:
        return rf"[\s\S]*({arg})[\s\S]*"
    raise ValueError(f"masking needs the constraint as a regex: {spec!r} is not keyword:WORD or regex:PATTERN; "
                     "give train.<proposal>.regex (a full-match regex over the decoded text)")


def automaton(b: Builder, hp: dict) -> TokenAutomaton:
    """The task's token automaton (built once per regex and task)."""
    s = b.setup
    pattern = fullmatch_regex(s.config, hp)
    key = ("automaton", b.task.name, pattern)
    if key not in b.extra:
        eos = s.model.eos_id
        if eos is None:
            raise ValueError("masking needs a model with an eos_id (EOS is allowed only where the text matches)")
        mask = regex_automaton(pattern, token_bytes(s.tokenizer, s.model.vocab_size), eos_id=eos, vocab_size=s.model.vocab_size)
        check_feasible(mask, s.max_new_tokens)
        b.extra[key] = mask
    return b.extra[key]


def _masked_lm(b: Builder, hp: dict) -> LM:
    s = b.setup
    lm = _context_lm(b, s.params)
    model = MaskedARM(s.model, int(lm.prompt_1P.shape[1]), s.max_new_tokens)
    return LM(model, MaskedARM.params_of(s.params, automaton(b, hp)), lm.prompt_1P, lm.mask_1P)


@register("masked")
def masked(b: Builder, hp: dict) -> Proposal:
    """Masked decoding of a (no training): sampled and scored under the masked law."""
    return Proposal(_masked_lm(b, hp), 0, [], None)


@register("sft_masked")
def sft_masked(b: Builder, hp: dict) -> Proposal:
    """SFT of a on (b-filtered) samples of masked decoding."""
    return _sft(b, "sft_masked", hp, _masked_lm(b, hp))


@register("sft_asap")
def sft_asap(b: Builder, hp: dict) -> Proposal:
    """SFT of a on (b-filtered) ASAp samples: hp `draws` (keep small: the trie is host-side), `asap_batch` rows
    per trie update."""
    s = b.setup
    n = int(hp.get("draws", 512))
    sampler = Asap(s.model, s.params, automaton(b, hp), s.max_new_tokens, prompt_1P=np.asarray(s.ids(b.task.context)))
    out = sampler.sample(s.key(b.task.name, "sft_asap", "asap-draws"), n, int(hp.get("asap_batch", 64)))
    keep = np.asarray(b.task.constraint(out.tokens_NT, out.lengths_N), bool)
    return _sft(b, "sft_asap", hp, None, (out.tokens_NT[keep], out.lengths_N[keep], int(keep.sum()), n))
