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
