"""guard_jax.proposals on a toy ARM with the exact evaluator: each recipe moves a' toward g as measured exactly,
samples are counted as drawn, warm starts begin where their source ended, the registry plugs new proposals in,
and a run folder never resumes a run trained with other settings."""

import dataclasses
import json
import math

import jax
import numpy as np
import pytest

from guard_jax import proposals as P
from guard_jax.evaluate import ExactEvaluator, draw_gold
from guard_jax.toy_demo import toy_problem

T = 5


@pytest.fixture(scope="module")
def toy():
    problem = toy_problem(seed=0, vocab_size=5, max_len=T, beta=0.5)
    gold = draw_gold(jax.random.PRNGKey(0), problem.a, problem.constraint, 2048, max_new_tokens=T, batch_size=512, progress=False)
    return problem, gold, ExactEvaluator(problem.a, problem.constraint, T)


def _kl(ev, lm):
    return ev.point(lm, 0, 0).kl_g_a2.value


SFT = P.SFTRecipeConfig(draws=2048, epochs=4, batch_size=16, learning_rate=0.05, eval_points=2)
DPG = P.DPGRecipeConfig(steps=6, n_samples=256, minibatch=256, learning_rate=0.05, eval_points=3)


def test_sft_on_filtered_samples_moves_toward_g(toy):
    problem, gold, ev = toy
    p = P.sft(problem.a, problem.constraint, gold, SFT, key=jax.random.PRNGKey(1), evaluator=ev, batch_size=512, progress=False,
              tensorboard=False)
    assert p.train_samples == 2048 and p.metrics_jsonl is None and p.lm.prompt == problem.a.prompt
    assert p.curve[0] == ev.start() and [q.samples for q in p.curve] == sorted(q.samples for q in p.curve)
    # steps 4 of 8 (the final step is the caller's evaluation); after one pass over the data every draw has been used
    assert [(q.step, q.samples) for q in p.curve] == [(0, 0), (4, 2048)]
    assert _kl(ev, p.lm) < ev.start().kl_g_a2.value - 0.5
    cap_sft = P.sft(problem.a, problem.constraint, gold, SFT, key=jax.random.PRNGKey(1), source=problem.a2, batch_size=512, progress=False,
                    tensorboard=False)
    assert cap_sft.curve == [] and _kl(ev, cap_sft.lm) != _kl(ev, p.lm)  # another source, other data


def test_dpg_and_its_warm_start(toy):
    problem, gold, ev = toy
    a, b = problem.a, problem.constraint
    d = P.dpg(a, b, gold, DPG, key=jax.random.PRNGKey(2), evaluator=ev, progress=False, tensorboard=False)
    assert d.train_samples == 6 * 256 and [q.samples for q in d.curve] == [0, 512, 1024]  # steps 2, 4 (6 is the final budget)
    assert _kl(ev, d.lm) < ev.start().kl_g_a2.value - 0.5
    s = P.sft(a, b, gold, SFT, key=jax.random.PRNGKey(1), batch_size=512, progress=False, tensorboard=False)
    w = P.warm_start_dpg(a, b, gold, DPG, key=jax.random.PRNGKey(3), start=s, evaluator=ev, progress=False, tensorboard=False)
    assert w.train_samples == s.train_samples + 6 * 256
    assert w.curve[0] == ev.point(s.lm, s.train_samples, 0) and w.curve[1].samples == s.train_samples + 512
    c = P.cap(a, b, gold, P.CAPConfig(prompt="x")) if a.tokenizer is not None else None
    assert c is None  # toy LMs have no tokenizer: CAP is given as an LM (the toy's mixture)
    wc = P.warm_start_dpg(a, b, gold, DPG, key=jax.random.PRNGKey(3), start=P.Proposal(problem.a2, 0, [], None), evaluator=ev,
                          progress=False, tensorboard=False)
    assert wc.curve[0] == ev.start() and wc.train_samples == 6 * 256  # from CAP: the policy starts at a


def test_l3m_aux_rl_recipes(toy):
    problem, gold, ev = toy
    a, b = problem.a, problem.constraint
    base = ev.start().kl_g_a2.value
    l = P.l3m(a, b, gold, P.L3MRecipeConfig(draws=2048, steps=4, n_samples=256, batch_size=16, learning_rate=0.05, threshold=0.9,
                                            eval_points=1), key=jax.random.PRNGKey(4), evaluator=ev, batch_size=512, progress=False,
              tensorboard=False)
    assert l.train_samples == 2048 + 4 * 256 and _kl(ev, l.lm) < base
    x = P.aux(a, b, gold, P.AuxRecipeConfig(steps=4, n_samples=256, learning_rate=0.1, eval_points=2), key=jax.random.PRNGKey(5),
              evaluator=ev, progress=False, tensorboard=False)
    assert x.train_samples == 4 * 256 and len(x.extras["q_curve"]) == len(x.curve) == 2
    assert ev.point(x.extras["q"], 0, 0).ar.value > ev.start().ar.value  # q = a·sigmoid(R) raises the acceptance rate
    r = P.rl(a, b, gold, P.RLRecipeConfig(beta=0.5, steps=4, n_samples=256, learning_rate=0.05, eval_points=1), key=jax.random.PRNGKey(6),
             evaluator=ev, progress=False, tensorboard=False)
    assert r.train_samples == 4 * 256 and ev.point(r.lm, 0, 0).extra["mass_b0"] > 0  # RL keeps mass on b = 0


def test_masked_recipes_guarantee_b(toy):
    from guard_jax.decoding import reachability_automaton

    problem, gold, ev = toy
    automaton = reachability_automaton(ev.space, ev.b)
    m = P.masked(problem.a, problem.constraint, gold, automaton=automaton)
    assert math.isclose(ev.point(m.lm, 0, 0).ar.value, 1.0, rel_tol=1e-6) and m.train_samples == 0
    s = P.sft_asap(problem.a, problem.constraint, gold, P.SFTAsapConfig(draws=64, asap_batch=16, batch_size=8, epochs=2, learning_rate=0.05),
                   automaton=automaton, key=jax.random.PRNGKey(7), progress=False, tensorboard=False)
    # the trie's root bound has come down from 1 toward Z, never below it
    assert s.train_samples == 64 and math.log(ev.start().ar.value) - 1e-6 <= s.extras["asap"].root_log_theta < 0.0


def test_a_run_folder_resumes_only_the_run_it_holds(toy, tmp_path):
    problem, gold, ev = toy
    a, b = problem.a, problem.constraint
    cfg = dataclasses.replace(DPG, steps=2, eval_points=1)
    first = P.dpg(a, b, gold, cfg, key=jax.random.PRNGKey(2), run_dir=tmp_path, evaluator=ev, progress=False, tensorboard=False)
    record = json.loads((tmp_path / "recipe.json").read_text())
    assert record["recipe"] == "dpg" and record["config"]["learning_rate"] == cfg.learning_rate
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    again = P.dpg(a, b, gold, cfg, key=jax.random.PRNGKey(2), run_dir=tmp_path, evaluator=ev, progress=False, tensorboard=False)
    assert (tmp_path / "metrics.jsonl").read_text().splitlines() == lines  # resumed at its last step: nothing retrained
    assert all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(first.lm.params), jax.tree.leaves(again.lm.params)))
    with pytest.raises(ValueError, match=r"holds a dpg run trained with other settings \(differing: learning_rate\)"):
        P.dpg(a, b, gold, dataclasses.replace(cfg, learning_rate=0.01), key=jax.random.PRNGKey(2), run_dir=tmp_path, evaluator=ev,
              progress=False, tensorboard=False)


def test_registry_names_and_a_new_proposal(toy, tmp_path):
    problem, gold, ev = toy
    with pytest.raises(ValueError, match="unknown proposal 'nope'.*sft_dpg"):
        P.lookup("nope")
    with pytest.raises(ValueError, match="must be a number"):
        P.lookup("rl:big")
    with pytest.raises(ValueError, match=r"unknown proposal 'sft_a:0.1'.*suffix: rl"):
        P.lookup("sft_a:0.1")
    assert {"cap", "sft_a", "sft_cap", "dpg", "sft_dpg", "cap_dpg", "l3m", "aux", "aux_q", "rl", "masked", "sft_masked", "sft_asap"} <= set(P.RECIPES)

    @dataclasses.dataclass(frozen=True, kw_only=True)
    class Temper:
        scale: float = 1.0

    @P.register("test_tempered", Temper)
    def tempered(bld, name, config):
        return P.Proposal(bld.a.with_params(jax.tree.map(lambda x: x * config.scale, bld.a.params)), 0, [], None)

    try:
        bld = P.Builder(problem.a, problem.constraint, gold, {"test_tempered": {"scale": 0.5}, "sft_a": SFT}, key=jax.random.PRNGKey(0),
                        cap=problem.a2, run_root=tmp_path, evaluator=ev, batch_size=512, progress=False, tensorboard=False)
        p = bld.get("test_tempered")
        assert np.allclose(p.lm.params["logits_NV"], 0.5 * problem.a.params["logits_NV"]) and bld.get("test_tempered") is p
        assert bld.get("cap").lm is problem.a2
        with pytest.raises(ValueError, match="unknown key 'scal'"):
            P.Builder(problem.a, problem.constraint, gold, {"test_tempered": {"scal": 2}}, key=jax.random.PRNGKey(0)).get("test_tempered")
    finally:
        del P.RECIPES["test_tempered"]


def test_builder_folders_follow_the_settings(toy, tmp_path):
    problem, gold, ev = toy
    make = lambda configs: P.Builder(problem.a, problem.constraint, gold, configs, key=jax.random.PRNGKey(0), cap=problem.a2,  # noqa: E731
                                     run_root=tmp_path, evaluator=ev, batch_size=512, progress=False, tensorboard=False, inputs={"x": 1})
    base = {"sft_a": SFT, "sft_dpg": {"steps": 2, "n_samples": 256, "minibatch": 256, "learning_rate": 0.05, "eval_points": 1},
            "aux": {"steps": 1, "n_samples": 64, "eval_points": 1}}
    b1 = make(base)
    w = b1.get("sft_dpg")
    assert w.curve[0] == b1.final("sft_a")  # the warm start begins where its source ended
    assert json.loads((b1.run_dir("sft_dpg") / "config.json").read_text())["needs"] == {"sft_a": b1.fingerprint("sft_a")}
    b2 = make(base | {"sft_a": dataclasses.replace(SFT, learning_rate=0.01)})
    assert b2.run_dir("sft_a") != b1.run_dir("sft_a") and b2.run_dir("sft_dpg") != b1.run_dir("sft_dpg")  # its source changed
    assert make(base).run_dir("sft_dpg") == b1.run_dir("sft_dpg")
    assert b1.get("aux_q").train_samples == b1.get("aux").train_samples  # aux_q is aux's q, from one run
