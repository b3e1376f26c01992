"""The exported `lexvla.vocab` module (not the notebook's globals): vendored asset intact, toy pruning, serialisation."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from lexvla.vocab import LLAMA2_GGUF, VocabRule, Vocabulary, llama2_dir, prune_vocab, vocab_report

LLAMA2_SHA256 = "16c3724582d59aa8bf84711894e833f916ee46a31d80e21312759c48bf8d0e69"


class _Tok:
    def __init__(self, tokens, special_ids=()):
        self.tokens, self.all_special_ids = list(tokens), list(special_ids)

    def get_vocab(self):
        return {t: i for i, t in enumerate(self.tokens)}


def test_vendored_llama2_vocabulary_is_unchanged() -> None:
    f = Path(llama2_dir()) / LLAMA2_GGUF
    assert hashlib.sha256(f.read_bytes()).hexdigest() == LLAMA2_SHA256
    assert (Path(llama2_dir()) / "README.md").exists()


def test_prune_and_round_trip() -> None:
    tok = _Tok(["<unk>", "<s>", "</s>", "<0x0A>", "▁dog", "▁Dog", "dog", "ing", "▁2019", "▁кот"], special_ids=[0, 1, 2])
    v = prune_vocab(tok)
    assert v.words == ("dog", "ing") and v.ids == (4, 7) and v.index("DOG") == 0
    assert Vocabulary.from_dict(json.loads(json.dumps(v.to_dict()))) == v
    rule = VocabRule(word_start=True, max_size=10)
    assert VocabRule.from_dict(json.loads(json.dumps(rule.to_dict()))) == rule
    assert prune_vocab(tok, rule).words == ("dog",)
    assert sum(vocab_report(tok).values()) == len(tok.tokens)
    with pytest.raises(ValueError, match="Unrecognised tokenizer vocabulary"):
        prune_vocab(_Tok(["[CLS]", "dog", "##s"]))


def test_keep_words_against_brute_force() -> None:
    """`keep` against a brute-force reading of its definition: the kept words of `keep`, then the lowest-id other
    words up to `max_size`; every other check still applies (a fragment in `keep` stays out, with a warning)."""
    toks = ["<unk>", "▁the", "▁dog", "▁cat", "▁sun", "▁moon", "▁star", "ing", "▁Sky", "▁sea"]
    tok = _Tok(toks, special_ids=[0])
    full = prune_vocab(tok, VocabRule(word_start=True))            # every word, lowest id first
    assert full.words == ("the", "dog", "cat", "sun", "moon", "star", "sky", "sea")
    for size, keep in [(3, ("sea",)), (4, ("sky", "moon")), (2, ("sea", "star")), (8, ("sea",)), (3, ())]:
        forced = [w for w in full.words if w in keep]
        others = [w for w in full.words if w not in keep][:size - len(forced)]
        want = tuple(w for w in full.words if w in forced or w in others)   # in token-id order
        got = prune_vocab(tok, VocabRule(word_start=True, max_size=size, keep=keep))
        assert got.words == want and len(got) == min(size, len(full)), (size, keep, got.words)
    with pytest.warns(UserWarning, match="ing"):                   # a fragment cannot be a word-start entry
        assert prune_vocab(tok, VocabRule(word_start=True, max_size=2, keep=("ing",))).words == ("the", "dog")
    with pytest.raises(ValueError, match="more than max_size"):
        VocabRule(max_size=1, keep=("a", "b"))


def test_main_job_v8_keeps_the_scene_worlds_single_token_words() -> None:
    """`main_job_v8.yaml` lists exactly the scene world's words that SmolLM2 spells as one token and that `smol`'s
    8,192-word cut drops, and with them every such word is in the vocabulary (checked on the real tokenizer)."""
    import yaml

    from lexvla.config import get_config
    from lexvla.core import package_path
    from lexvla.pretrained import load_tokenizer
    from lexvla.scenes import CONTENT_WORDS, TEMPLATE_WORDS

    cfg = get_config("smol")
    tok, rule = load_tokenizer(cfg.text), cfg.vocab
    words = sorted(CONTENT_WORDS | TEMPLATE_WORDS)
    single = [w for w in words if len(tok.tokenize(" " + w)) == 1]
    base = prune_vocab(tok, rule)
    dropped = sorted(w for w in single if base.index(w) is None)
    recipe = yaml.safe_load(package_path("configs", "main_job_v8.yaml").read_text())
    keep = recipe["model_overrides"]["vocab"]["keep"]
    assert sorted(keep) == dropped and len(dropped) == 10, (keep, dropped)
    v = prune_vocab(tok, VocabRule.from_dict(rule.to_dict() | {"keep": keep}))
    assert len(v) == len(base) == 8192 and all(v.index(w) is not None for w in single)


def test_main_job_v9_is_v7_with_v8s_kept_words() -> None:
    "`main_job_v9.yaml` (43_recipe, round 10) is `main_job_v7.yaml`'s recipe plus `main_job_v8.yaml`'s kept words, nothing else."
    import yaml

    from lexvla.core import package_path

    v7, v8, v9 = (yaml.safe_load(package_path("configs", f"main_job_v{i}.yaml").read_text()) for i in (7, 8, 9))
    assert v9["model_overrides"].pop("vocab") == v8["model_overrides"]["vocab"]
    assert v9 == v7
