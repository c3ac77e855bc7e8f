"""The `guard-jax` command. Subcommands wire arguments to library calls; no logic lives here."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys

import jax


def _toy(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from guard_jax.evaluate import monte_carlo
    from guard_jax.io import atomic_write_json
    from guard_jax.rejection import guard_sample
    from guard_jax.toy_demo import toy_problem

    console = Console()
    p = toy_problem(args.seed, args.vocab, args.max_len, not args.no_eos, args.beta)
    console.print(f"[bold]Toy GUARD problem[/]: a = random tabular ARM over {args.vocab}^{args.max_len} "
                  f"({p.space.size:,} sequences{', EOS 0' if not args.no_eos else ''}), b = {p.constraint.name}, "
                  f"a' = exact ARM of (1-{args.beta}) a + {args.beta} h (h: the gold law of another random ARM)")
    key = jax.random.PRNGKey(args.seed)
    mc = monte_carlo(key, p.a, p.a2, p.constraint, args.max_len, args.n_a, args.n_a2, args.batch_size, progress=not args.quiet)
    ex = p.exact
    exact = {"Z": ex.z, "AR_a2": ex.ar, "AR_gain": ex.ar / ex.z, "KL(g||a)": ex.kl_g_a, "KL(g||a2)": ex.kl_g_a2,
             "KL(g||g2)": ex.kl_g_g2, "KL(g2||g)": ex.kl_g2_g}
    table = Table(title=f"exact vs Monte Carlo (N_a = {args.n_a:,}, N_a' = {args.n_a2:,}, 95% CI)")
    for col in ("quantity", "exact", "estimate", "95% CI", "exact in CI"):
        table.add_column(col, justify="right")
    for name, est in mc.items():
        table.add_row(name.replace("a2", "a'").replace("g2", "g'"), f"{exact[name]:.5g}", f"{est.value:.5g}",
                      f"[{est.lo:.4g}, {est.hi:.4g}]", "yes" if est.contains(exact[name]) else "[red]no[/]")
    console.print(table)
    rhs_exact = -ex.log_ar + ex.kl_g_g2
    rhs_mc = -math.log(mc["AR_a2"].value) + mc["KL(g||g2)"].value
    console.print(f"Theorem 2  KL(g||a') = -log AR_a' + KL(g||g'):  exact {ex.kl_g_a2:.6f} = {rhs_exact:.6f} "
                  f"(|diff| {abs(ex.kl_g_a2 - rhs_exact):.1e});  Monte Carlo {mc['KL(g||a2)'].value:.4f} vs {rhs_mc:.4f}")
    r = guard_sample(jax.random.fold_in(key, 1), p.a2, p.constraint, args.num_guard, max_new_tokens=args.max_len, batch_size=args.batch_size, progress=not args.quiet)
    ok = bool(p.constraint(r.tokens_NT, r.lengths_N).all())
    console.print(f"GUARD sampler with a': {len(r.tokens_NT):,} samples, all satisfy b: {ok}; {r.draws:,} draws, "
                  f"AR {r.ar} (exact {ex.ar:.4g}); expected cost 1/AR = {1 / ex.ar:.2f} draws per sample "
                  f"vs {1 / ex.z:.2f} with a")
    if args.out:
        atomic_write_json(args.out, {"args": {k: v for k, v in vars(args).items() if k != "func"}, "exact": exact, "monte_carlo": {k: v._asdict() for k, v in mc.items()},
                                     "guard": {"draws": r.draws, "accepted": r.accepted, "all_satisfy_b": ok}})
        console.print(f"results written to {args.out}")
    return 0 if ok else 1


def _load(path: str):
    """The LM of a Hugging Face folder, which must hold a tokenizer (unconditional: prompt [BOS])."""
    from guard_jax.lm import LM

    lm = LM.load(path)
    if lm.tokenizer is None:
        raise ValueError(f"{path} has no tokenizer files (tokenizer.json, tokenizer_config.json): this command decodes "
                         f"text; save the tokenizer into the folder with tokenizer.save_pretrained({path!r})")
    return lm


def _sample(args: argparse.Namespace) -> int:
    from guard_jax.constraints import from_spec
    from guard_jax.io import atomic_write_text
    from guard_jax.rejection import guard_sample

    lm = _load(args.model).with_context(args.prompt)
    constraint = from_spec(args.constraint, lm.tokenizer)
    r = guard_sample(jax.random.PRNGKey(args.seed), lm, constraint, args.num, max_new_tokens=args.max_new_tokens,
                     batch_size=args.batch_size, max_draws=args.max_draws, progress=not args.quiet)
    texts = lm.decode(r.tokens_NT, r.lengths_N)
    lines = [json.dumps({"text": t, "logp": float(lp)}) for t, lp in zip(texts, r.logp_N)]
    if args.out:
        atomic_write_text(args.out, "\n".join(lines) + "\n")
    else:
        print("\n".join(lines))
    print(f"{len(texts)} samples satisfying {constraint.name}; {r.draws:,} draws, AR {r.ar}", file=sys.stderr)
    return 0


def _estimate(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from guard_jax.constraints import from_spec
    from guard_jax.evaluate import monte_carlo
    from guard_jax.io import atomic_write_json

    a = _load(args.model).with_context(args.context)
    constraint = from_spec(args.constraint, a.tokenizer)
    if args.proposal:  # a fine-tuned proposal, read with a's tokenizer
        proposal = _load(args.proposal)
        a2 = dataclasses.replace(a, model=proposal.model, params=proposal.params)
    else:  # CAP: the same model with a constraint-aware prompt before the context
        a2 = a.with_prefix(args.cap_prompt) if args.cap_prompt else a
    mc = monte_carlo(jax.random.PRNGKey(args.seed), a, a2, constraint, args.max_new_tokens, args.n_a, args.n_a2,
                     args.batch_size, progress=not args.quiet)
    table = Table(title=f"{constraint.name}: a = {args.model}, a' = {args.proposal or repr(args.cap_prompt)}")
    for col in ("quantity", "estimate", "95% CI"):
        table.add_column(col, justify="right")
    for name, est in mc.items():
        table.add_row(name.replace("a2", "a'").replace("g2", "g'"), f"{est.value:.5g}", f"[{est.lo:.4g}, {est.hi:.4g}]")
    Console().print(table)
    if args.out:
        atomic_write_json(args.out, {k: v._asdict() for k, v in mc.items()})
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="guard-jax", description="GUARD: guaranteed generation from language models, in JAX.")
    sub = parser.add_subparsers(dest="command", required=True)
    toy = sub.add_parser("toy", help="exact vs Monte-Carlo Z, AR, KL(g||a'), KL(g||g') and Theorem 2 on a toy ARM")
    toy.add_argument("--vocab", type=int, default=6, help="vocabulary size V (>= 4)")
    toy.add_argument("--max-len", type=int, default=6, help="sequence length T")
    toy.add_argument("--no-eos", action="store_true", help="fixed-length sequences (no EOS token)")
    toy.add_argument("--beta", type=float, default=0.5, help="a' = (1 - beta) a + beta h, in [0, 1] (h: gold law of another ARM)")
    toy.add_argument("--n-a", type=int, default=200_000, help="samples of a for Z and the g-samples")
    toy.add_argument("--n-a2", type=int, default=50_000, help="samples of a' for AR_a' and the g'-samples")
    toy.add_argument("--num-guard", type=int, default=5_000, help="samples the GUARD sampler returns")
    toy.add_argument("--batch-size", type=int, default=8192)
    toy.add_argument("--seed", type=int, default=0)
    toy.add_argument("--out", help="write the results as JSON here (atomically)")
    toy.add_argument("--quiet", action="store_true", help="no progress bars")
    toy.set_defaults(func=_toy)

    def common(p):
        p.add_argument("--model", required=True, help="a local Hugging Face folder (gpt2, gemma, gemma2)")
        p.add_argument("--constraint", required=True, help="keyword:WORD, regex:PATTERN or sentiment:THRESHOLD (join with ' & ')")
        p.add_argument("--max-new-tokens", type=int, default=30)
        p.add_argument("--batch-size", type=int, default=256)
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--out", help="output file (written atomically)")
        p.add_argument("--quiet", action="store_true")

    smp = sub.add_parser("sample", help="GUARD sampler: samples of a model that all satisfy a constraint")
    common(smp)
    smp.add_argument("--prompt", default="", help="context the samples continue (after BOS)")
    smp.add_argument("--num", type=int, default=100, help="accepted samples to return")
    smp.add_argument("--max-draws", type=int, default=10**6)
    smp.set_defaults(func=_sample)

    est = sub.add_parser("estimate", help="Z, AR_a', KL(g||a'), KL(g||g'), KL(g'||g) with CIs for a proposal")
    common(est)
    est.add_argument("--proposal", help="Hugging Face folder of a fine-tuned proposal a' (default: CAP with --cap-prompt)")
    est.add_argument("--cap-prompt", default="", help="constraint-aware prompt prepended to the context for a'")
    est.add_argument("--context", default="", help="context shared by a and a'")
    est.add_argument("--n-a", type=int, default=100_000)
    est.add_argument("--n-a2", type=int, default=20_000)
    est.set_defaults(func=_estimate)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
