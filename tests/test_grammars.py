"""Grammars through llguidance: b(y), next-token masks and ASAp's sets, checked against oracles and exact laws.

On a toy CFG over a 7-token byte-level BPE (tests/grammar_toy.py), enumerated: b and the masks match a hand-made
oracle; GUARD's rejection sampler returns g' exactly, masked decoding returns its locally normalised law (not g),
ASAp's exact law (from its trie) converges to g. On the embedded tokenizer: a Lark grammar, a JSON schema and a
regex each give b, masks and ASAp, and "café" (two byte-level pieces for "é") round-trips through all of them.
"""

import jax
import numpy as np
import pytest

from guard_jax.decoding import Asap, exact_masked_log_prob, grammar_masked_sample, regex_automaton
from guard_jax.estimators import estimate_ar
from guard_jax.exact import exact_constraint, exact_log_prob, exact_quantities
from guard_jax.grammars import Grammar, token_bytes
from guard_jax.lm import EMBEDDED, LM
from guard_jax.rejection import guard_sample
from guard_jax.sampling import bos_prompt, sample
from tests.grammar_toy import CFG, MODEL, TOKENS, language, text_of, toy_grammar_problem, toy_tokenizer
from tests.test_exact import _chi_square_ok


@pytest.fixture(scope="module")
def toy():
    return toy_grammar_problem()


@pytest.fixture(scope="module")
def b_grid(toy):
    grammar, _, space, _ = toy
    return exact_constraint(space, grammar.constraint())


def test_b_is_membership_of_the_decoded_text(toy, b_grid):
    _, _, space, _ = toy
    tokens = np.asarray(space.tokens(np.arange(space.size)))
    valid = np.asarray(space.lengths_and_valid(tokens)[1])
    lang = language()
    oracle = valid & np.asarray([text_of(row) in lang for row in tokens])
    np.testing.assert_array_equal(b_grid, oracle)
    both = [i for i in np.flatnonzero(b_grid) if 6 in tokens[i]]  # "1+" as one token and as two both satisfy b
    assert both and any(3 in tokens[i] and 1 in tokens[i] for i in np.flatnonzero(b_grid))


def test_masks_are_every_token_that_keeps_the_text_a_prefix_of_the_language(toy):
    grammar, _, space, _ = toy
    lang = language()
    prefixes = {s[:k] for s in lang for k in range(len(s) + 1)}
    levels = grammar.allowed_levels(space)
    V = space.vocab_size
    checked = 0
    for t, level in enumerate(levels):
        for code in range(V**t):
            prefix = [int(d) for d in np.base_repr(code, V).zfill(t)] if t else []
            text = "".join(TOKENS[v] for v in prefix)
            if 0 in prefix or text not in prefixes:
                continue
            want = np.asarray([text + TOKENS[v] in prefixes if v else text in lang for v in range(V)])
            np.testing.assert_array_equal(level[code], want, err_msg=f"after {prefix} ({text!r})")
            np.testing.assert_array_equal(grammar.allowed_ids(prefix), np.flatnonzero(want))
            checked += 1
    assert checked > 20


def test_guard_returns_g_prime_exactly(toy, b_grid, x64):
    grammar, params, space, log_a = toy
    # a proposal a' != a: a's logits raised by 2 on the tokens the grammar allows (rows in TabularARM's prefix order)
    params2 = {"logits_NV": params["logits_NV"] + 2.0 * np.concatenate(grammar.allowed_levels(space))}
    log_a2 = np.asarray(exact_log_prob(MODEL, params2, MODEL.max_len), np.float64)
    out = guard_sample(jax.random.PRNGKey(0), LM.of(MODEL, params2), grammar.constraint(), 3000, max_new_tokens=5,
                       batch_size=1024, progress=False)
    index = space.index(out.tokens_NT)
    assert b_grid[index].all()
    log_g2 = np.where(b_grid, log_a2, -np.inf)
    _chi_square_ok(index, np.exp(log_g2 - np.logaddexp.reduce(log_g2)))
    exact = exact_quantities(log_a, log_a2, b_grid)
    assert exact.kl_g_g2 > 0.02  # g' is not g: GUARD returns the law of its proposal, restricted to b
    ar = estimate_ar(out.accepted, out.draws, level=0.999)
    assert ar.lo <= exact.ar <= ar.hi


def test_masked_decoding_returns_the_locally_normalised_law_not_g(toy, b_grid, x64):
    grammar, params, space, log_a = toy
    log_q = exact_masked_log_prob(space, log_a, b_grid, allowed_levels=grammar.allowed_levels(space))
    assert np.isclose(np.exp(log_q).sum(), 1.0)
    prompt, pmask = bos_prompt(MODEL, 3000)
    s = grammar_masked_sample(jax.random.PRNGKey(1), MODEL, params, prompt, pmask, grammar, 5)
    index = space.index(s.tokens_BT)
    np.testing.assert_allclose(s.logp_B, log_q[index], atol=1e-4)
    np.testing.assert_allclose(s.base_logp_B, log_a[index], atol=1e-4)
    _chi_square_ok(index, np.exp(log_q))
    q = exact_quantities(log_a, log_q, b_grid)
    assert q.kl_g_a2 > 0.05 and np.exp(log_q[~b_grid]).sum() > 0.01  # distorted, and cut-off strings fail b
    np.testing.assert_array_equal(grammar.accepts(s.tokens_BT, s.lengths_B), b_grid[index])


def test_asap_from_a_grammar_converges_to_g(toy, b_grid, x64):
    grammar, params, space, log_a = toy
    allowed = grammar.allowed_levels(space)
    asap = Asap(MODEL, params, grammar, 5)
    kls, checkpoints = [], [0, 20, 100, 400]
    for k0, k1 in zip([0] + checkpoints, checkpoints):
        if k1 > k0:
            s = asap.sample(jax.random.PRNGKey(k1), k1 - k0, batch_size=4)
            np.testing.assert_array_equal(s.accepted_N, b_grid[space.index(s.tokens_NT)])
        log_q = exact_masked_log_prob(space, log_a, b_grid, asap.log_theta_levels(space), allowed)
        kls.append(exact_quantities(log_a, log_q, b_grid).kl_g_a2)
    masking = exact_masked_log_prob(space, log_a, b_grid, allowed_levels=allowed)
    assert kls[0] == pytest.approx(exact_quantities(log_a, masking, b_grid).kl_g_a2)  # starts as masking
    assert kls[-1] < 0.05 * kls[0] and kls[-1] <= kls[-2] <= kls[1] < kls[0]
    hist = np.asarray(asap.history)
    assert np.all(np.diff(hist) <= 1e-12) and hist[-1] >= exact_quantities(log_a, log_a, b_grid).log_z - 1e-5


def test_grammar_that_allows_everything_samples_like_the_plain_sampler(toy):
    _, params, _, _ = toy
    anything = Grammar.regex(r"[\s\S]*", toy_tokenizer())
    prompt, pmask = bos_prompt(MODEL, 64)
    ours = grammar_masked_sample(jax.random.PRNGKey(4), MODEL, params, prompt, pmask, anything, 5)
    ref = sample(jax.random.PRNGKey(4), MODEL, params, prompt, pmask, 5)
    np.testing.assert_array_equal(ours.tokens_BT, np.asarray(ref.tokens_BT))
    np.testing.assert_allclose(ours.logp_B, np.asarray(ref.logp_B), atol=1e-5)


def test_host_masks_grow_the_cache_and_score_as_teacher_forcing(embedded_tokenizer):
    """On the embedded model at 24 tokens (the host loop grows its cache once, after 12, as the jitted samplers
    do), a JSON schema's masked samples carry a's log-probs equal to teacher-forced scoring, and their masked
    log-probs are those of masking's law as an LM (`proposals.masked_lm`, scored)."""
    from guard_jax.proposals import masked_lm
    from guard_jax.sampling import score

    lm = LM.load("embedded")
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"], "additionalProperties": False}
    grammar = Grammar.json_schema(schema, embedded_tokenizer, vocab_size=lm.model.vocab_size)
    prompt, pmask = lm.prompt_arrays(16)
    ours = grammar_masked_sample(jax.random.PRNGKey(2), lm.model, lm.params, prompt, pmask, grammar, 24, dense=False)
    assert ours.lengths_B.max() > 12  # past the cache's growth
    np.testing.assert_allclose(ours.base_logp_B, score(lm, ours.tokens_BT, ours.lengths_B, batch_size=16), atol=1e-3)
    q = masked_lm(lm, grammar, 24)
    np.testing.assert_allclose(ours.logp_B, score(q, ours.tokens_BT, ours.lengths_B, batch_size=16), atol=1e-3)


def test_batched_masks_are_each_rows_own_when_rows_share_prefixes(toy):
    """`MatcherBatch.fill` computes one mask per distinct prefix and copies it: every row's mask is still the
    grammar's mask after that row's own tokens, as rows that shared a prefix part ways."""
    grammar = toy[0]
    rows = [[1, 3, 2], [1, 3, 1], [1, 3, 2], [4, 1, 5], [4, 2, 5], [2, 3, 1]]  # "1+2", "1+1", "(1)", ...: prefixes shared, then split
    batch = grammar.batch(len(rows))
    bitmask_BW = np.empty((len(rows), grammar.mask_words), np.int32)
    for t in range(3):
        batch.fill(bitmask_BW)
        bits_BV = np.unpackbits(bitmask_BW.view(np.uint8), axis=1, bitorder="little")[:, : grammar.vocab_size].astype(bool)
        for i, row in enumerate(rows):
            np.testing.assert_array_equal(np.flatnonzero(bits_BV[i]), grammar.allowed_ids(row[:t]), err_msg=f"row {i} step {t}")
        batch.consume(np.asarray([row[t] for row in rows]))


def test_bad_inputs_name_the_argument(toy):
    tok = toy_tokenizer()
    with pytest.raises(ValueError, match="lark"):
        Grammar.lark("start: (", tok)
    with pytest.raises(ValueError, match="eos_id"):
        grammar_masked_sample(jax.random.PRNGKey(0), MODEL, toy[1], *bos_prompt(MODEL, 2), Grammar.lark(CFG, tok, vocab_size=9), 5)


# ---- the embedded tokenizer: byte-level BPE with 8,192 tokens ----


@pytest.fixture(scope="module")
def embedded_tokenizer():
    import transformers

    return transformers.AutoTokenizer.from_pretrained(str(EMBEDDED))


def _walks(grammar, ids):
    """Every token of `ids` is in the mask after the tokens before it."""
    return all(ids[k] in grammar.allowed_ids(ids[:k]) for k in range(len(ids)))


@pytest.mark.parametrize("kind", ["lark", "json_schema", "regex"])
def test_cafe_round_trips_through_every_kind(embedded_tokenizer, kind):
    tok = embedded_tokenizer
    text = {"lark": "café", "json_schema": '"café"', "regex": "café"}[kind]
    grammar = {"lark": lambda: Grammar.lark('start: "caf" ("é" | "e")', tok, vocab_size=8192),
               "json_schema": lambda: Grammar.json_schema({"enum": ["café", "cafe"]}, tok, vocab_size=8192),
               "regex": lambda: Grammar.regex("caf(é|e)", tok, vocab_size=8192)}[kind]()
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert any(len(token_bytes(tok, 8192)[i]) == 1 and token_bytes(tok, 8192)[i][0] >= 0x80 for i in ids)  # a half of "é"
    assert grammar.accepts(np.asarray([ids + [tok.eos_token_id]]), np.asarray([len(ids) + 1]))[0]
    assert not grammar.accepts(np.asarray([ids[:-1]]), np.asarray([len(ids) - 1]))[0]  # "caf" + half a character
    assert _walks(grammar, ids + [tok.eos_token_id])


def test_regex_automaton_accepts_the_tokenizers_own_cafe(embedded_tokenizer):
    tok = embedded_tokenizer
    mask = regex_automaton("café", token_bytes(tok, 8192), eos_id=tok.eos_token_id, vocab_size=8192)
    ids = tok("café", add_special_tokens=False)["input_ids"]
    other = tok("cafe", add_special_tokens=False)["input_ids"]
    got = mask.accepts(np.asarray([ids, other + [tok.eos_token_id] * (len(ids) - len(other))]), np.asarray([len(ids), len(other)]))
    np.testing.assert_array_equal(np.asarray(got), [True, False])


def test_json_schema_gives_b_masks_and_asap_on_the_embedded_model(embedded_tokenizer):
    from guard_jax.lm import LM

    tok = embedded_tokenizer
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"], "additionalProperties": False}
    grammar = Grammar.json_schema(schema, tok, vocab_size=8192, json_options={"whitespace_flexible": False})
    good, bad = '{"n":42}', '{"n":"x"}'
    for text, want in ((good, True), (bad, False), ('{"n": 42}', False)):
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert grammar.accepts(np.asarray([ids]), np.asarray([len(ids)]))[0] == want
    assert _walks(grammar, tok(good, add_special_tokens=False)["input_ids"])
    lm = LM.load("embedded")
    prompt, pmask = lm.prompt_arrays(8)
    s = grammar_masked_sample(jax.random.PRNGKey(0), lm.model, lm.params, prompt, pmask, grammar, 12)
    texts = tok.batch_decode([row[:n].tolist() for row, n in zip(s.tokens_BT, s.lengths_B)], skip_special_tokens=True)
    assert all(t.startswith('{"n":') for t in texts)  # the schema's forced start, whatever a prefers
    ended = s.tokens_BT[np.arange(8), s.lengths_B - 1] == tok.eos_token_id
    assert grammar.accepts(s.tokens_BT, s.lengths_B)[ended].all()
    out = Asap(lm.model, lm.params, grammar, 12, prompt_1P=np.asarray(lm.prompt)).sample(jax.random.PRNGKey(1), 4, batch_size=4)
    np.testing.assert_array_equal(out.accepted_N, grammar.accepts(out.tokens_NT, out.lengths_N))


def test_regex_automaton_reads_bytes_as_the_tokenizer_decodes_them(embedded_tokenizer):
    """Random sequences of byte pieces, multi-byte tokens and ASCII tokens: b of the dense automaton is
    re.fullmatch on tokenizer.decode (unfinished or invalid bytes read as U+FFFD)."""
    import re

    tok = embedded_tokenizer
    tb = token_bytes(tok, 8192)
    pool = np.asarray([i for i, t in tb.items() if len(t) == 1 or any(x >= 0x80 for x in t)] + list(range(60, 120)))
    pattern = "(\ufffd|a|é)+"
    mask = regex_automaton(pattern, tb, eos_id=tok.eos_token_id, vocab_size=8192)
    tokens = np.random.default_rng(0).choice(pool, size=(3000, 4))
    want = np.asarray([re.fullmatch(pattern, tok.decode(row.tolist())) is not None for row in tokens])
    np.testing.assert_array_equal(np.asarray(mask.accepts(tokens, np.full(3000, 4))), want)
    assert 0.01 < want.mean() < 0.99  # both outcomes occur


def test_asap_log_prob_is_the_exact_law_of_its_trie(toy, b_grid, x64):
    """Asap.log_prob on every grid point: masking's law with an empty trie, the trie's exact law after sampling."""
    grammar, params, space, log_a = toy
    allowed = grammar.allowed_levels(space)
    tokens = np.asarray(space.tokens(np.arange(space.size)))
    lengths, valid = (np.asarray(x) for x in space.lengths_and_valid(tokens))
    keep = np.flatnonzero(valid)[::17]  # a spread of grid points, b = 0 and b = 1
    asap = Asap(MODEL, params, grammar, 5)
    masking = exact_masked_log_prob(space, log_a, b_grid, allowed_levels=allowed)
    np.testing.assert_allclose(asap.log_prob(tokens[keep], lengths[keep]), masking[keep], atol=1e-4)
    asap.sample(jax.random.PRNGKey(5), 60, batch_size=4)
    exact = exact_masked_log_prob(space, log_a, b_grid, asap.log_theta_levels(space), allowed)
    got = asap.log_prob(tokens[keep], lengths[keep])
    np.testing.assert_array_equal(np.isfinite(got), np.isfinite(exact[keep]))
    np.testing.assert_allclose(got[np.isfinite(got)], exact[keep][np.isfinite(got)], atol=1e-4)
    assert not np.allclose(exact, masking)


def test_asap_as_lm_samples_and_scores_its_trie_law_exactly(toy, b_grid, x64):
    """The trie's law (masking's with an empty trie) as an LM: its exact law over the grid (teacher-forced
    scoring through the host bias) equals the trie's exact law, and the LM's own sampler draws from it."""
    grammar, params, space, log_a = toy
    allowed = grammar.allowed_levels(space)
    a = LM.of(MODEL, params)
    asap = Asap(MODEL, params, grammar, 5)
    for n in (0, 60):
        if n:
            asap.sample(jax.random.PRNGKey(5), n, batch_size=4)
        want = exact_masked_log_prob(space, log_a, b_grid, asap.log_theta_levels(space), allowed)
        lm = asap.as_lm(a)
        got = np.asarray(exact_log_prob(lm.model, lm.params, 5), np.float64)
        reached = np.exp(want) > 1e-12
        np.testing.assert_allclose(got[reached], want[reached], atol=1e-4)
        assert np.isclose(np.exp(got).sum(), 1.0)
    prompt, pmask = lm.prompt_arrays(3000)
    s = sample(jax.random.PRNGKey(6), lm.model, lm.params, prompt, pmask, 5)
    index = space.index(np.asarray(s.tokens_BT))
    np.testing.assert_allclose(np.asarray(s.logp_B), want[index], atol=1e-4)
    _chi_square_ok(index, np.exp(want))
    with pytest.raises(ValueError, match="as_lm needs the LM"):
        asap.as_lm(a.with_prompt([MODEL.bos_id, 1]))


def test_every_mask_path_accepts_multi_byte_words_as_the_tokenizer_splits_them(embedded_tokenizer):
    """The embedded tokenizer's own tokens of "café" and "naïve" (each with a two-byte character), through every
    path that builds or reads a mask: b of the grammar and of the dense table, the llguidance masks and the dense
    table's (length-aware) masks at every step, ASAp's allowed sets (Asap.log_prob over both kinds of mask) and
    the masked LMs the experiments sample and score (`proposals.masked_lm`)."""
    from guard_jax.proposals import masked_lm
    from guard_jax.sampling import score

    tok = embedded_tokenizer
    lm = LM.load("embedded")
    V, eos, T = lm.model.vocab_size, tok.eos_token_id, 8
    words = ["café", "naïve"]
    tb = token_bytes(tok, V)
    pattern = "(café|naïve|plain)"
    grammar = Grammar.regex(pattern, tok, vocab_size=V)
    dense = regex_automaton(pattern, tb, eos_id=eos, vocab_size=V)
    paths = [tok(w, add_special_tokens=False)["input_ids"] + [eos] for w in words]
    for w, path in zip(words, paths):
        assert len(b"".join(tb[i] for i in path[:-1])) > len(w) and any(any(x >= 0x80 for x in tb[i]) for i in path[:-1])
    tokens_NT = np.asarray([p + [eos] * (T - len(p)) for p in paths])
    lengths_N = np.asarray([len(p) for p in paths])
    assert grammar.constraint()(tokens_NT, lengths_N).all() and np.asarray(dense.constraint()(tokens_NT, lengths_N)).all()
    for w, path in zip(words, paths):
        assert _walks(grammar, path), w
        state = dense.init_state(1)
        for t, v in enumerate(path):  # the dense table's mask allows each token with T - t - 1 tokens left after it
            assert bool(np.asarray(dense.allowed(state, T - t - 1))[0, v]), (w, t)
            state = dense.advance(state, np.asarray([v]))
    logp_a = score(lm, tokens_NT, lengths_N, batch_size=2)
    for mask in (grammar, dense):
        asap = Asap(lm.model, lm.params, mask, T, prompt_1P=np.asarray(lm.prompt))
        assert np.isfinite(asap.log_prob(tokens_NT, lengths_N)).all(), type(mask).__name__
        logq = score(masked_lm(lm, mask, T), tokens_NT, lengths_N, batch_size=2)
        assert np.isfinite(logq).all() and (logq >= logp_a - 1e-4).all(), type(mask).__name__  # masking only raises them


def test_tokenizer_binding_is_made_once_per_tokenizer(embedded_tokenizer):
    """Binding walks the whole vocabulary: every grammar on one tokenizer object shares one binding per
    (vocab_size, eos_id, slices); another tokenizer object binds afresh."""
    import transformers

    from guard_jax.grammars import llg_tokenizer

    tok = embedded_tokenizer
    first = Grammar.regex("a+", tok, vocab_size=8192).tokenizer
    assert Grammar.lark('start: "b"', tok, vocab_size=8192).tokenizer is first is llg_tokenizer(tok, 8192)
    assert llg_tokenizer(tok, 8192, slices=[]) is not first and llg_tokenizer(tok, 8192, slices=[]) is llg_tokenizer(tok, 8192, slices=())
    other = transformers.AutoTokenizer.from_pretrained(str(EMBEDDED))
    assert llg_tokenizer(other, 8192) is not first


def _sentencepiece_tokenizer():
    """A small SentencePiece-style fast tokenizer: "▁" for spaces, <0xNN> byte-fallback tokens, added tokens."""
    import tokenizers
    import transformers
    from tokenizers import decoders, models, normalizers

    pieces = ["<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256)), "▁", "<b>", "a", "b", "é", "▁ca", "fé", "▁na", "ïve"]
    tk = tokenizers.Tokenizer(models.BPE(vocab={p: i for i, p in enumerate(pieces)}, merges=[], unk_token="<unk>", byte_fallback=True))
    tk.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tk.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    tk.add_special_tokens(["<s>", "</s>", "[SPEC]"])
    tk.add_tokens(["<extra>", "zzq", "x<y>"])
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="</s>", bos_token="<s>", unk_token="<unk>")


def test_byte_list_binding_reads_every_token_as_llguidance_does(embedded_tokenizer):
    """The binding from a byte-level tokenizer's byte list (the fast path) gives every id the bytes and special
    flag, and every text the tokens, that llguidance's own reading of the tokenizer gives, and "café" is
    accepted through it; a SentencePiece tokenizer (byte fallback) is left to llguidance and reads the same."""
    import llguidance.hf

    from guard_jax.grammars import _bind, _hf_token_list

    import transformers

    spm = _sentencepiece_tokenizer()
    grown = transformers.AutoTokenizer.from_pretrained(str(EMBEDDED))
    grown.add_tokens(["<extra>", "zzq", "x<y>"])  # added tokens: llguidance counts the <...> one as special
    assert _hf_token_list(grown) is not None and _hf_token_list(spm) is None
    for tok, n_vocab in ((embedded_tokenizer, None), (embedded_tokenizer, 8200), (grown, None), (spm, None)):
        ours, ref = _bind(tok, n_vocab, None, None), llguidance.hf.from_tokenizer(tok, n_vocab=n_vocab)
        assert (ours.vocab_size, ours.eos_token) == (ref.vocab_size, ref.eos_token)
        for i in range(ref.vocab_size):
            assert (ours.decode_bytes([i]), ours.is_special_token(i)) == (ref.decode_bytes([i]), ref.is_special_token(i)), i
        for text in ("café naïve", " hello, world!", "<|endoftext|>x"):
            assert ours.tokenize_str(text) == ref.tokenize_str(text), text
    ids = embedded_tokenizer("café", add_special_tokens=False)["input_ids"]
    assert Grammar.regex("café", _bind(embedded_tokenizer, None, None, None)).accepts([ids], [len(ids)])[0]


def test_host_masked_lms_of_one_model_share_compiled_programs(toy):
    """Masking by a grammar and ASAp's law are HostMaskedARMs that compare equal (their bias is found by the id in
    their params), so the sampler is compiled once for both, and each still samples its own law."""
    from guard_jax import sampling
    from guard_jax.proposals import masked_lm

    grammar, params, _, _ = toy
    a = LM.of(MODEL, params)
    asap = Asap(MODEL, params, grammar, 5)
    asap.sample(jax.random.PRNGKey(1), 20, batch_size=4)
    masked, learned = masked_lm(a, grammar, 5), asap.as_lm(a)
    assert masked.model == learned.model and hash(masked.model) == hash(learned.model)
    prompt, pmask = masked.prompt_arrays(256)
    key = jax.random.PRNGKey(2)
    before = sampling.sample._cache_size()
    got = [np.asarray(sample(key, q.model, q.params, prompt, pmask, 5).logp_B) for q in (masked, learned, masked)]
    assert sampling.sample._cache_size() - before <= 1
    np.testing.assert_array_equal(got[0], got[2])
    assert not np.allclose(got[0], got[1])  # the same program, each LM's own bias


def _dense_samples_equal_to_llguidance(lm, grammar, batch_size: int, max_new_tokens: int, key):
    """grammar_masked_sample's default (dense) route, checked bit for bit against llguidance's (`dense=False`)
    -> the dense route's samples."""
    prompt, pmask = lm.prompt_arrays(batch_size)
    dense = grammar_masked_sample(key, lm.model, lm.params, prompt, pmask, grammar, max_new_tokens)
    host = grammar_masked_sample(key, lm.model, lm.params, prompt, pmask, grammar, max_new_tokens, dense=False)
    for got, want in zip(dense, host):
        np.testing.assert_array_equal(got, want)
    return dense


@pytest.mark.parametrize("pattern", ["[0-9]{4}-[0-9]{2}-[0-9]{2}", "[a-z]+( [a-z]+)*"])
def test_dense_route_runs_on_the_device_across_segments_with_the_same_samples(embedded_tokenizer, pattern):
    """The dense route's on-device loop over 30 steps (three cache segments: 10, 20, 30) gives llguidance's
    route's samples bit for bit, whether every row ends early (a date: about 11 tokens, so the loop stops in
    the second segment) or rows run to the last step (words)."""
    lm = LM.load("embedded")
    grammar = Grammar.regex(pattern, embedded_tokenizer, vocab_size=8192)
    dense = _dense_samples_equal_to_llguidance(lm, grammar, 16, 30, jax.random.PRNGKey(5))
    ended_B = dense.tokens_BT[np.arange(16), dense.lengths_B - 1] == lm.model.eos_id
    if pattern.startswith("[0-9]"):
        assert ended_B.all() and 10 < dense.lengths_B.max() < 20  # every row ended, in the second segment
        assert grammar.accepts(dense.tokens_BT, dense.lengths_B).all()
    else:
        assert dense.lengths_B.max() == 30  # rows reached the last step of the third segment


def test_small_regex_masks_come_from_a_dense_table_with_the_same_samples(embedded_tokenizer):
    """A small regex (here with "é", two byte-level pieces) samples from its dense on-device table by default:
    the table's mask after every sampled prefix is llguidance's, and the samples (tokens, lengths, both
    log-probs) are bit for bit those of llguidance's masks. A JSON schema that is not regular, or a table over its
    cell limit, has none."""
    from guard_jax.decoding.gcd import dense_masks
    from guard_jax.sampling import unpack_bitmask

    tok = embedded_tokenizer
    lm = LM.load("embedded")
    grammar = Grammar.regex("caf(é|e)( [a-z]+)?", tok, vocab_size=8192)
    table = dense_masks(grammar)
    assert table is not None and dense_masks(grammar) is table  # built once per grammar
    key = jax.random.PRNGKey(3)
    dense = _dense_samples_equal_to_llguidance(lm, grammar, 8, 12, key)
    assert grammar.accepts(dense.tokens_BT, dense.lengths_B).any()
    masks_SV = np.asarray(unpack_bitmask(table.bitmask_SW, 8192))
    next_SV = np.asarray(table.next_state_SV)
    for row, n in zip(dense.tokens_BT, dense.lengths_B):
        state = int(table.initial_state)
        for k in range(int(n)):
            np.testing.assert_array_equal(np.flatnonzero(masks_SV[state]), grammar.allowed_ids(row[:k].tolist()))
            state = int(next_SV[state, row[k]])
    assert dense_masks(Grammar.json_schema({"type": "object"}, tok, vocab_size=8192)) is None  # any JSON object: not regular
    assert dense_masks(grammar, max_cells=8192) is None
    with pytest.raises(ValueError, match="dense=True"):
        grammar_masked_sample(key, lm.model, lm.params, *lm.prompt_arrays(8), Grammar.json_schema({"type": "object"}, tok, vocab_size=8192),
                              12, dense=True)
