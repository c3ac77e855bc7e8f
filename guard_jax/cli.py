"""The `guard-jax` command. Subcommands wire arguments to library calls; no logic lives here."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import re
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
    mc = monte_carlo(key, p.a, p.a2, p.constraint, max_new_tokens=args.max_len, n_a=args.n_a, n_a2=args.n_a2, batch_size=args.batch_size,
                     progress=not args.quiet).estimates()
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
    mc = monte_carlo(jax.random.PRNGKey(args.seed), a, a2, constraint, max_new_tokens=args.max_new_tokens, n_a=args.n_a, n_a2=args.n_a2,
                     batch_size=args.batch_size, progress=not args.quiet).estimates()
    table = Table(title=f"{constraint.name}: a = {args.model}, a' = {args.proposal or repr(args.cap_prompt)}")
    for col in ("quantity", "estimate", "95% CI"):
        table.add_column(col, justify="right")
    for name, est in mc.items():
        table.add_row(name.replace("a2", "a'").replace("g2", "g'"), f"{est.value:.5g}", f"[{est.lo:.4g}, {est.hi:.4g}]")
    Console().print(table)
    if args.out:
        atomic_write_json(args.out, {k: v._asdict() for k, v in mc.items()})
    return 0


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: `guard-jax CMD: error: ... (see guard-jax CMD --help)`, exit 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="guard-jax", description="GUARD: guaranteed generation from language models, in JAX.")
    debug = argparse.ArgumentParser(add_help=False)
    debug.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    sub = parser.add_subparsers(dest="command", required=True)
    toy = sub.add_parser("toy", parents=[debug], help="exact vs Monte-Carlo Z, AR, KL(g||a'), KL(g||g') and Theorem 2 on a toy ARM")
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
        p.add_argument("--model", required=True, help="a local Hugging Face folder (gpt2, gemma, gemma2), or 'embedded'")
        p.add_argument("--constraint", required=True, help="keyword:WORD, regex:PATTERN or sentiment:THRESHOLD, combined with "
                       "&, |, ~ and parentheses; quote an argument holding spaces or & | ~ ( ), e.g. \"keyword:love & regex:'a|b'\"")
        p.add_argument("--max-new-tokens", type=int, default=30)
        p.add_argument("--batch-size", type=int, default=256)
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--out", help="output file (written atomically)")
        p.add_argument("--quiet", action="store_true")

    smp = sub.add_parser("sample", parents=[debug], help="GUARD sampler: samples of a model that all satisfy a constraint")
    common(smp)
    smp.add_argument("--prompt", default="", help="context the samples continue (after BOS)")
    smp.add_argument("--num", type=int, default=100, help="accepted samples to return")
    smp.add_argument("--max-draws", type=int, default=10**6)
    smp.set_defaults(func=_sample)

    est = sub.add_parser("estimate", parents=[debug], help="Z, AR_a', KL(g||a'), KL(g||g'), KL(g'||g) with CIs for a proposal")
    common(est)
    est.add_argument("--proposal", help="Hugging Face folder of a fine-tuned proposal a' (default: CAP with --cap-prompt)")
    est.add_argument("--cap-prompt", default="", help="constraint-aware prompt prepended to the context for a'")
    est.add_argument("--context", default="", help="context shared by a and a'")
    est.add_argument("--n-a", type=int, default=100_000)
    est.add_argument("--n-a2", type=int, default=20_000)
    est.set_defaults(func=_estimate)
    return parser


class UsageError(ValueError):
    """A flag with a bad value; the message names the flag and the fix."""


_POSITIVE = {"toy": ("max_len", "n_a", "n_a2", "num_guard", "batch_size"),
             "sample": ("num", "max_new_tokens", "batch_size", "max_draws"),
             "estimate": ("max_new_tokens", "batch_size", "n_a", "n_a2")}
_TOY_MAX_SEQUENCES = 20_000_000


def _flag(dest: str) -> str:
    return "--" + dest.replace("_", "-")


def _model_folder(path: str, flag: str):
    """The folder `path` names ('embedded': the shipped base LM), checked: config.json, model type, tokenizer."""
    import pathlib

    from guard_jax.lm import EMBEDDED
    from guard_jax.models import hf

    folder = EMBEDDED if path == "embedded" else pathlib.Path(path)
    try:
        config = hf.read_config(folder)
        model = hf.module_for(config).from_hf_config(config)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UsageError(f"{flag} {path}: {e}") from None
    tokenizer = hf.load_tokenizer(folder)
    if tokenizer is None:
        raise UsageError(f"{flag} {path}: no tokenizer files (tokenizer.json, tokenizer_config.json); this command decodes text: "
                         f"save the tokenizer into the folder with tokenizer.save_pretrained")
    return model, tokenizer


def _check_positions(model, tokenizer, flag: str, path: str, text: str, max_new_tokens: int, text_flags: str) -> None:
    limit = getattr(model, "n_positions", None) or getattr(model, "max_position_embeddings", None)
    prompt = 1 + (len(tokenizer(text, add_special_tokens=False)["input_ids"]) if text else 0)
    if limit is not None and prompt + max_new_tokens > limit:
        raise UsageError(f"--max-new-tokens {max_new_tokens}: the prompt (BOS{' + ' + text_flags if text else ''}: {prompt} "
                         f"token{'s' if prompt > 1 else ''}) "
                         f"plus {max_new_tokens} new tokens need {prompt + max_new_tokens} positions but {flag} {path} has {limit}; "
                         f"use --max-new-tokens {max(limit - prompt, 1)} or less")


def _check_out(path: str | None) -> None:
    """--out must be a file we can create: try it (and remove the probe) before any work is done."""
    import os
    import pathlib
    import tempfile

    if path is None:
        return
    target = pathlib.Path(path)
    if target.is_dir():
        raise UsageError(f"--out {path} is a folder; give a file name, e.g. --out {target / 'results.json'}")
    parent = target.parent
    while not parent.exists():
        parent = parent.parent
    try:
        fd, probe = tempfile.mkstemp(dir=parent, prefix=f".{target.name}.", suffix=".tmp")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise UsageError(f"--out {path}: cannot create files in {str(parent)!r} ({e.strerror}); pick a writable path") from None


def validate(args: argparse.Namespace) -> None:
    """Every check that needs no model weights, before anything is loaded or sampled; raises UsageError."""
    from guard_jax.constraints import parse_spec

    for dest in _POSITIVE[args.command]:
        if getattr(args, dest) < 1:
            raise UsageError(f"{_flag(dest)} must be >= 1, got {getattr(args, dest)}")
    _check_out(args.out)
    if args.command == "toy":
        if args.vocab < 4:
            raise UsageError(f"--vocab must be >= 4 (the toy constraint uses tokens 1, 2, 3), got {args.vocab}")
        if not 0 <= args.beta <= 1:
            raise UsageError(f"--beta must be in [0, 1] (0: a' = a, 1: a' = g), got {args.beta}")
        if args.max_len * math.log(args.vocab) > math.log(_TOY_MAX_SEQUENCES):  # V^T, without computing a huge power
            raise UsageError(f"--vocab {args.vocab} --max-len {args.max_len}: the toy enumerates {args.vocab}^{args.max_len} sequences, "
                             f"more than {_TOY_MAX_SEQUENCES:,}; lower --vocab or --max-len")
        return
    try:
        parse_spec(args.constraint)
    except ValueError as e:
        raise UsageError(f"--constraint: {e}") from None
    model, tokenizer = _model_folder(args.model, "--model")
    if args.command == "sample":
        _check_positions(model, tokenizer, "--model", args.model, args.prompt, args.max_new_tokens, "--prompt")
        return
    _check_positions(model, tokenizer, "--model", args.model, args.context, args.max_new_tokens, "--context")
    if args.proposal:
        model2, _ = _model_folder(args.proposal, "--proposal")
        _check_positions(model2, tokenizer, "--proposal", args.proposal, args.context, args.max_new_tokens, "--context")
    else:
        _check_positions(model, tokenizer, "--model", args.model, args.cap_prompt + args.context, args.max_new_tokens,
                         "--cap-prompt + --context")


# library argument names in error messages -> the flags that set them
_FLAGS = {"num_samples": "--num", "max_draws": "--max-draws", "n_a2": "--n-a2", "n_a": "--n-a", "draws_a2": "--n-a2",
          "draws_a": "--n-a", "max_new_tokens": "--max-new-tokens", "batch_size": "--batch-size"}


def _one_line(e: BaseException) -> str:
    """The message on one line, library argument names replaced by their flags."""
    text = " ".join(str(e).split()) or type(e).__name__
    return re.sub(r"\b(" + "|".join(_FLAGS) + r")\b", lambda m: _FLAGS[m.group(1)], text)


def main(argv: list[str] | None = None) -> int:
    """Run a subcommand. A bad argument or input prints one line naming the flag (or file) and the fix and
    returns 2, without a traceback; `--debug` shows the traceback instead."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # argparse: --help (0) or a one-line usage error (2)
        return int(e.code or 0)
    try:
        validate(args)
        return args.func(args)
    except KeyboardInterrupt:
        print(f"guard-jax {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if args.debug:
            raise
        user = isinstance(e, (ValueError, OSError, FloatingPointError, RuntimeError))
        what = _one_line(e) if user else f"{type(e).__name__}: {_one_line(e)} (an internal error; rerun with --debug for the traceback)"
        print(f"guard-jax {args.command}: error: {what}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
