"""Masked decoding and ASAp: cost relative to plain sampling; grammar mask builds. One JSON line per config.

    python -m bench.bench_decoding [--repeats 3] [--quick] [--dense-large]

Dense token automata (the jitted on-device table):
- `masked_vs_plain`: per-token time of `masked_sample` / `sample` (same model, batch, length; goal <= 1.3x);
- `mask_only`: time per token of the mask alone (allowed_BV + state update, jitted scan), no model;
- `asap`: ASAp samples/s (host trie, jitted model calls), one sample per trie update and rounds of 32.
Configs: a toy tabular ARM (V=8, T=6) with exact reachability masks for "contains (1, 2)"; random-weight
GPT-2s, tiny (2 layers, 64 dims, V=1000, batch 32, 32 tokens) and small (6 layers, 384 dims, V=8192, batch
64, 128 tokens), with a regex mask over a random vocabulary of letter/digit strings.

Grammars through llguidance (`guard_jax.grammars`):
- `grammar_build`: seconds and resident memory (RSS growth, approximate) to bind a tokenizer (once per
  tokenizer) and to build a regex, a 4-field JSON schema and a CFG with their first mask, at V = 8,192 (the
  embedded tokenizer) and on synthetic byte-level vocabularies of 50,257 and 256,000 tokens (goal for the
  JSON schema at 256,000: <= 1 s and <= 100 MB); the dense `regex_automaton` for the same regex beside it
  (at 256,000 only with --dense-large: minutes);
- `grammar_masked_vs_plain`: per-token time of `grammar_masked_sample` / `sample` on the embedded model (B = 128,
  30 tokens; goal <= 1.3x). Its routes (`route`): the regex, the JSON schema and the CFG by default from
  their dense tables (`dense_masks`: an on-device loop per cache segment; the schema through
  `guard_jax.json_regex`, the CFG unrolled by `guard_jax.lark_fsm`), and each with llguidance's masks
  (`dense=False`: a host loop, two jitted calls per token, the host's masks overlapped with the decode); the
  host loop's floor (`(?s:.*)` with `dense=False`: every token allowed, the least mask work);
  the length-aware dense table's `masked_sample` for the regex; and the CFG's masked LM
  (`proposals.masked_lm`: the masks come back from the host inside the jitted scan, what the experiments
  sample and score). grammar_masked_sample stops once every row has ended (`steps`): its reference is plain
  sampling of `steps` tokens. `ratio`: the median over interleaved (plain, masked) pairs of wall time, with
  its range; `cpu_ratio`: the same with this process's CPU time (all threads), steadier than wall time on a
  shared machine; `load_average`: the 1-minute load at the end.
- the bind rows: the first binding of a tokenizer and the cached one (`llg_tokenizer` keeps one binding per
  tokenizer object), with llguidance's general slices and without; `mask_ms`: one more mask after the first;
- `grammar_bind`: a byte-level Hugging Face tokenizer of the synthetic vocabulary (50,257 and 256,000 tokens)
  bound by llguidance's own reading (`llguidance.hf.from_tokenizer`) and from the byte list `llg_tokenizer`
  builds (the same bytes), interleaved.
"""

from __future__ import annotations

import argparse
import functools
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import transformers

from bench.common import emit, timed
from guard_jax import constraints as C
from guard_jax.decoding import Asap, grammar_masked_sample, masked_sample, reachability_automaton, regex_automaton
from guard_jax.decoding.gcd import dense_masks
from guard_jax.exact import SequenceSpace, exact_constraint
from guard_jax.grammars import Grammar, llg_tokenizer, token_bytes
from guard_jax.lm import EMBEDDED, LM
from guard_jax.models.gpt2 import GPT2
from guard_jax.models.toy import TabularARM
from guard_jax.proposals import masked_lm
from guard_jax.sampling import bos_prompt, sample

REGEX = r"([a-z]+ )+[0-9]+"


def toy_config():
    model = TabularARM(8, 6, eos_id=0)
    space = SequenceSpace.of(model, 6)
    return "tabular V=8 T=6", model, model.init(jax.random.PRNGKey(0), scale=1.5), reachability_automaton(space, exact_constraint(space, C.contains_ngram([1, 2]))), 6


def gpt2_config(name, n_layer, n_embd, n_head, V, T):
    rng = np.random.default_rng(0)
    letters = "abcdefghijklmnopqrstuvwxyz"
    strings = {i: "".join(rng.choice(list(letters + "0123456789 "), size=rng.integers(1, 5))) for i in range(1, V)}
    model = GPT2(vocab_size=V, n_positions=T + 1, n_embd=n_embd, n_layer=n_layer, n_head=n_head, bos_id=0, eos_id=0)
    return (f"{name} GPT-2 {n_layer}x{n_embd} V={V}", model, model.init(jax.random.PRNGKey(0)),
            regex_automaton(REGEX, strings, eos_id=0, vocab_size=V), T)


tiny_config = functools.partial(gpt2_config, "tiny", 2, 64, 2, 1000, 32)
small_config = functools.partial(gpt2_config, "small", 6, 384, 6, 8192, 128)


def bench_masked(name, model, params, mask, T, B, repeats):
    prompt, pmask = bos_prompt(model, B)
    key = jax.random.PRNGKey(1)
    plain = lambda: sample(key, model, params, prompt, pmask, T).tokens_BT.block_until_ready()
    masked = lambda: masked_sample(key, model, params, prompt, pmask, mask, T).tokens_BT.block_until_ready()
    plain(), masked()
    pairs = [(timed(plain, 1), timed(masked, 1)) for _ in range(repeats)]  # interleaved: a shared machine drifts
    t_plain, t_masked = (float(np.median(x)) for x in zip(*pairs))
    emit({"bench": "masked_vs_plain", "config": name, "B": B, "T": T, "states": mask.num_states,
          "plain_ms_per_token": round(1e3 * t_plain / T, 4), "masked_ms_per_token": round(1e3 * t_masked / T, 4),
          "ratio": round(t_masked / t_plain, 3), "goal_ratio": 1.3})


@functools.partial(jax.jit, static_argnames=("B", "T"))
def _mask_scan(mask, B, T):
    """T steps of allowed_BV + advance on the first allowed token (no model, no sampling)."""

    def step(state_B, t):
        allowed_BV = mask.allowed(state_B, T - t - 1)
        return mask.advance(state_B, jnp.argmax(allowed_BV, axis=1)), allowed_BV.sum()

    return jax.lax.scan(step, mask.init_state(B), jnp.arange(T))[1]


def bench_mask_only(name, mask, T, B, repeats):
    run = lambda: _mask_scan(mask, B, T).block_until_ready()
    run()
    t = timed(run, repeats)
    emit({"bench": "mask_only", "config": name, "B": B, "T": T, "V": mask.vocab_size, "states": mask.num_states,
          "ms_per_token": round(1e3 * t / T, 4)})


def bench_asap(name, model, params, mask, T, num_samples, batch_size):
    asap = Asap(model, params, mask, T)
    asap.sample(jax.random.PRNGKey(0), batch_size, batch_size=batch_size)  # compile
    t0 = time.perf_counter()
    s = asap.sample(jax.random.PRNGKey(1), num_samples, batch_size=batch_size)
    dt = time.perf_counter() - t0
    emit({"bench": "asap", "config": name, "T": T, "batch_size": batch_size, "samples": num_samples,
          "samples_per_s": round(num_samples / dt, 1), "trie_nodes": len(asap.nodes), "all_accepted": bool(s.accepted_N.all()),
          "root_theta": float(np.exp(asap.root_log_theta))})


# ---- grammars through llguidance ----

GRAMMAR_REGEX = r"[0-9]{4}-[0-9]{2}-[0-9]{2}"
ANYTHING = r"(?s:.*)"  # every text: the host loop with the least mask work
JSON_SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 20}, "age": {"type": "integer", "minimum": 0, "maximum": 120},
                   "email": {"type": "string", "pattern": "^[a-z]+@[a-z]+\\.com$"}, "active": {"type": "boolean"}},
    "required": ["name", "age", "email", "active"],
    "additionalProperties": False,
}
CFG = 'start: expr\nexpr: term ((" + " | " - ") term)*\nterm: NUMBER | "(" expr ")"\nNUMBER: /[0-9]+/\n'


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


class SyntheticTokenizer:
    """A byte-level vocabulary of V tokens for llguidance: EOS (id 0), the 256 single bytes, then distinct random
    strings of 2-8 printable ASCII characters; tokenizes bytes one byte per token."""

    def __init__(self, vocab_size: int, seed: int = 0):
        rng = np.random.default_rng(seed)
        alphabet = np.frombuffer(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 .,:;\"{}[]-_@", np.uint8)
        tokens = [b"<eos>"] + [bytes([i]) for i in range(256)]
        seen = set(tokens)
        while len(tokens) < vocab_size:  # vectorised draws, deduplicated in order
            n = 2 * (vocab_size - len(tokens))
            lengths, chars = rng.integers(2, 9, n), rng.choice(alphabet, (n, 8))
            for row, k in zip(chars, lengths):
                t = row[:k].tobytes()
                if t not in seen and len(tokens) < vocab_size:
                    seen.add(t)
                    tokens.append(t)
        self.tokens, self.eos_token_id, self.bos_token_id, self.special_token_ids = tokens, 0, None, [0]

    def __call__(self, text):
        return [1 + b for b in (text.encode() if isinstance(text, str) else text)]


def _grammars(tokenizer, vocab_size=None):
    """kind -> a function that builds that grammar on `tokenizer`."""
    return {"regex": lambda: Grammar.regex(GRAMMAR_REGEX, tokenizer, vocab_size=vocab_size),
            "json_schema": lambda: Grammar.json_schema(JSON_SCHEMA, tokenizer, vocab_size=vocab_size),
            "cfg": lambda: Grammar.lark(CFG, tokenizer, vocab_size=vocab_size)}


def _bind(tok, slices):
    """An LLTokenizer for `tok` through the cached binding (`llg_tokenizer`); the synthetic vocabulary through
    llguidance's TokenizerWrapper (cached the same way here)."""
    import llguidance

    if not isinstance(tok, SyntheticTokenizer):
        return llg_tokenizer(tok, slices=slices)
    key = tuple(slices) if slices is not None else None
    cache = tok.__dict__.setdefault("_bound", {})
    if key not in cache:
        cache[key] = llguidance.LLTokenizer(llguidance.TokenizerWrapper(tok), slices=slices)
    return cache[key]


def bench_grammar_build(name, make_tokenizer, dense: bool):
    tok = make_tokenizer()
    for slices, label in ((None, "general slices"), ([], "no slices")):
        for what in ("bind tokenizer", "bind tokenizer again (cached)"):
            r0, t0 = _rss_mb(), time.perf_counter()
            lt = _bind(tok, slices)
            emit({"bench": "grammar_build", "config": name, "what": what, "slices": label, "V": lt.vocab_size,
                  "seconds": round(time.perf_counter() - t0, 4), "rss_mb": round(_rss_mb() - r0, 1)})
        for kind, build in _grammars(lt).items():
            r0, t0 = _rss_mb(), time.perf_counter()
            g = build()
            m = g.matcher()
            m.compute_bitmask()
            dt, mb = time.perf_counter() - t0, _rss_mb() - r0
            t1 = time.perf_counter()
            for _ in range(20):
                m.compute_bitmask()
            row = {"bench": "grammar_build", "config": name, "what": kind, "slices": label, "V": lt.vocab_size, "seconds": round(dt, 4),
                   "rss_mb": round(mb, 1), "mask_ms": round(1e3 * (time.perf_counter() - t1) / 20, 4)}
            if kind == "json_schema":
                row |= {"goal_seconds": 1.0, "goal_mb": 100}
            emit(row)
    if dense:
        tb = token_bytes(lt)
        r0, t0 = _rss_mb(), time.perf_counter()
        mask = regex_automaton(GRAMMAR_REGEX, tb, eos_id=lt.eos_token, vocab_size=lt.vocab_size)
        emit({"bench": "grammar_build", "config": name, "what": "dense regex_automaton", "V": lt.vocab_size, "states": mask.num_states,
              "seconds": round(time.perf_counter() - t0, 4), "rss_mb": round(_rss_mb() - r0, 1),
              "table_mb": round(mask.next_state_SV.nbytes / 2**20, 1)})


def byte_level_hf_tokenizer(vocab_size: int):
    """The synthetic vocabulary as a Hugging Face byte-level BPE fast tokenizer (GPT-2's byte alphabet, no
    merges, EOS "<eos>" = id 0): what `llg_tokenizer` binds from its byte list or llguidance reads itself."""
    import tokenizers

    from transformers.convert_slow_tokenizer import bytes_to_unicode

    char_of = bytes_to_unicode()
    syn = SyntheticTokenizer(vocab_size)
    vocab = {"".join(char_of[b] for b in t): i for i, t in enumerate(syn.tokens) if i > 0}
    tk = tokenizers.Tokenizer(tokenizers.models.BPE(vocab={"<eos>": 0, **vocab}, merges=[]))
    tk.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = tokenizers.decoders.ByteLevel()
    tk.add_special_tokens(["<eos>"])
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<eos>")


def bench_bind_paths(vocab_size: int, repeats: int):
    """Binding one byte-level HF tokenizer: llguidance's own reading (`llguidance.hf.from_tokenizer`) against the
    byte list `llg_tokenizer` builds (same bytes), with general slices and none, interleaved; median seconds."""
    import llguidance.hf

    from guard_jax.grammars import _bind

    tok = byte_level_hf_tokenizer(vocab_size)
    for slices, label in ((None, "general slices"), ([], "no slices")):
        pairs = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            llguidance.hf.from_tokenizer(tok, slices=slices)
            t1 = time.perf_counter()
            _bind(tok, None, None, slices)
            pairs.append((t1 - t0, time.perf_counter() - t1))
        hf_s, ours_s = (float(np.median(x)) for x in zip(*pairs))
        emit({"bench": "grammar_bind", "config": f"byte-level HF BPE V={vocab_size}", "slices": label, "repeats": repeats,
              "llguidance_hf_seconds": round(hf_s, 3), "byte_list_seconds": round(ours_s, 3), "speedup": round(hf_s / ours_s, 2),
              "load_average": round(os.getloadavg()[0], 1)})


def bench_grammar_masked(repeats: int, B: int = 128, T: int = 30):
    lm = LM.load("embedded")
    model, params = lm.model, lm.params
    prompt, pmask = lm.prompt_arrays(B)
    key = jax.random.PRNGKey(1)
    plain_of = lambda n: (lambda: sample(key, model, params, prompt, pmask, n).tokens_BT.block_until_ready())
    grammars = {kind: build() for kind, build in _grammars(lm.tokenizer, model.vocab_size).items()}
    runs = {}  # mask -> (where its masks come from, a run)
    for kind, g in grammars.items():  # the tables, built once (grammar_masked_sample's default route)
        t0 = time.perf_counter()
        table = dense_masks(g)
        emit({"bench": "grammar_build", "config": f"embedded GPT-2 V={model.vocab_size}", "what": f"{kind} dense_masks (checked)",
              "seconds": round(time.perf_counter() - t0, 4), "states": None if table is None else int(table.next_state_SV.shape[0])})
        runs[kind] = ("dense table" if table is not None else "llguidance masks",
                      lambda g=g: grammar_masked_sample(key, model, params, prompt, pmask, g, T))
    for kind, g in grammars.items():
        runs[f"{kind}, llguidance masks (dense=False)"] = (
            "llguidance masks", lambda g=g: grammar_masked_sample(key, model, params, prompt, pmask, g, T, dense=False))
    anything = Grammar.regex(ANYTHING, lm.tokenizer, vocab_size=model.vocab_size)
    runs["host loop floor: every token allowed, llguidance masks (dense=False)"] = (
        "llguidance masks", lambda: grammar_masked_sample(key, model, params, prompt, pmask, anything, T, dense=False))
    stops_early = set(runs)  # the grammar_masked_sample runs so far; the scans below always run T steps
    dense_mask = regex_automaton(GRAMMAR_REGEX, token_bytes(lm.tokenizer, model.vocab_size), eos_id=model.eos_id, vocab_size=model.vocab_size)
    runs["dense regex_automaton"] = ("dense table", lambda: masked_sample(key, model, params, prompt, pmask, dense_mask, T))
    q = masked_lm(lm, Grammar.lark(CFG, lm.tokenizer, vocab_size=model.vocab_size), T)  # the masked LM the experiments use
    runs["cfg, masked LM (host bias in the jitted scan)"] = ("llguidance masks", lambda: sample(key, q.model, q.params, prompt, pmask, T))
    for kind, (route, run) in runs.items():
        # grammar_masked_sample stops once every row has ended (the scans always run T): its reference is plain
        # sampling of as many tokens as it ran, so both attend over caches of the same lengths
        steps = int(np.max(run().lengths_B)) if kind in stops_early else T
        masked, plain = lambda: jax.block_until_ready(run()), plain_of(steps)
        plain()
        pairs = [(_wall_and_cpu(plain), _wall_and_cpu(masked)) for _ in range(repeats)]  # interleaved: the machine drifts
        wall = [m[0] / p[0] for p, m in pairs]
        cpu = [m[1] / p[1] for p, m in pairs]
        emit({"bench": "grammar_masked_vs_plain", "config": f"embedded GPT-2 V={model.vocab_size}", "mask": kind, "route": route,
              "B": B, "T": T,
              "steps": steps, "plain_ms_per_token": round(1e3 * float(np.median([p[0] for p, _ in pairs])) / steps, 3),
              "masked_ms_per_token": round(1e3 * float(np.median([m[0] for _, m in pairs])) / steps, 3),
              "ratio": round(float(np.median(wall)), 3), "ratio_range": [round(min(wall), 3), round(max(wall), 3)],
              "cpu_ratio": round(float(np.median(cpu)), 3), "goal_ratio": 1.3, "load_average": round(os.getloadavg()[0], 1)})


def _wall_and_cpu(fn) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process, all its threads) of one call of `fn`."""
    w0, c0 = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - w0, time.process_time() - c0


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--quick", action="store_true", help="toy and tiny configs only; grammars at V = 8,192 and 50,257")
    parser.add_argument("--dense-large", action="store_true", help="also build the dense regex table at V = 256,000")
    parser.add_argument("--grammars-only", action="store_true", help="only the llguidance benchmarks")
    args = parser.parse_args(argv)
    embedded = lambda: transformers.AutoTokenizer.from_pretrained(str(EMBEDDED))
    vocabs = [("embedded V=8192", embedded, True), ("synthetic V=50257", lambda: SyntheticTokenizer(50257), True)]
    if not args.quick:
        vocabs.append(("synthetic V=256000", lambda: SyntheticTokenizer(256000), args.dense_large))
    for name, make, dense in vocabs:
        bench_grammar_build(name, make, dense)
    for V in (50257,) + (() if args.quick else (256000,)):
        bench_bind_paths(V, 3)
    bench_grammar_masked(args.repeats)
    if args.grammars_only:
        return
    configs = [(toy_config, 256, 256), (tiny_config, 32, 64)] + ([] if args.quick else [(small_config, 64, 64)])
    for make, B, asap_n in configs:
        name, model, params, mask, T = make()
        bench_masked(name, model, params, mask, T, B, args.repeats)
        bench_mask_only(name, mask, T, B, args.repeats)
        for batch in (1, 32):
            bench_asap(name, model, params, mask, T, asap_n, batch)


if __name__ == "__main__":
    main()
