"""Bad input is refused with an error that names the problem: the long lists of refusals that used to run inline in
the library notebooks (which keep one or two examples each and link here).

    70_core (coerce), 72_config (configs and their files), 06_model (encoders), 77_multinode (Machines),
    79_search (vectors, ids and the index's add/search/open)
"""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from lexvla.config import LexVLAConfig, TextConfig, VisionConfig, get_config
from lexvla.core import ConfigError, coerce


def refuses(fn, contains: str) -> None:
    "`fn()` raises, and the message contains `contains`."
    with pytest.raises(Exception) as e: fn()
    assert contains in str(e.value), f"{contains!r} not in {str(e.value)!r}"


# --- 70_core: coerce, the one type checker of configs and notebook parameters ---

@pytest.mark.parametrize("value, ann, field, message", [
    (5.5, int, "TrainConfig.max_steps", "TrainConfig.max_steps must be an integer, got 5.5 (float)"),
    (True, int, "n", "n must be an integer, got True (bool)"),
    ([1, 2], float, "TrainConfig.lr_lora", "TrainConfig.lr_lora must be a number, got [1, 2] (list)"),
    ([0.9], tuple[float, float], "b", "b must be a list of 2 values (a number, a number)"),
    (["a", 3], str | tuple[str, ...], "urls", "urls[1] must be a string, got 3 (int)"),
    (3, str | tuple[str, ...], "urls", "urls must be a string or a list (each item a string), got 3 (int)"),
])
def test_coerce_names_the_field(value, ann, field, message) -> None:
    refuses(lambda: coerce(value, ann, field), message)
    with pytest.raises(ConfigError): coerce(value, ann, field)


# --- 72_config: configs, the registry and config files ---

@pytest.mark.parametrize("build, message", [
    (lambda: LexVLAConfig.from_dict({"name": "x", "txet": {}}), "Unknown LexVLAConfig field(s): txet"),
    (lambda: TextConfig(prompt="no slot"), "exactly one '{text}'"),
    (lambda: get_config("tiny", head="latent"), "LexVLAConfig.head must be one of ['lexical', 'dense'], got 'latent'"),
    (lambda: get_config("tiny", dense_dim=0), "LexVLAConfig.dense_dim must be >= 1"),
    (lambda: get_config("tiny_dense", text=TextConfig(mode="bow")), "head='dense' needs text.mode='lm'"),
    (lambda: LexVLAConfig.from_dict({"text": {"lora_r": 8.5}}), "LexVLAConfig.text.lora_r must be an integer, got 8.5"),
    (lambda: TextConfig(prefix_cache="false"), "TextConfig.prefix_cache must be true or false, got 'false' (str)"),
    (lambda: TextConfig(score_offset=-1.0), "TextConfig.score_offset must be >= 0 nats, got -1.0"),
    (lambda: LexVLAConfig.from_dict({"text": {"score_offset": [4]}}), "LexVLAConfig.text.score_offset must be a number"),
    (lambda: VisionConfig(mean=[0.5, "x", 0.5]), "VisionConfig.mean[1] must be a number"),
])
def test_configs_refuse_bad_fields(build, message) -> None:
    refuses(build, message)


def test_a_bad_config_file_is_named(tmp_path: Path) -> None:
    p = tmp_path / "bad.yaml"
    p.write_text("name: x\ntext:\n  lora_r: [1, 2]\n")
    refuses(lambda: get_config(p), f"{p}: LexVLAConfig.text.lora_r must be an integer, got [1, 2]")
    p.write_text("name: x\ntext: {lora_r: 4\n")                       # a YAML syntax error names the file and line
    refuses(lambda: get_config(p), f"{p} is not valid YAML")
    refuses(lambda: get_config(p), f'in "{p}", line')


# --- 06_model: the encoders ---

def test_the_encoders_refuse_bad_input() -> None:
    from lexvla.pretrained import create_model
    model = create_model("tiny").eval()
    vt = model.encode_text(["a red star", "a grey square"])
    refuses(lambda: model.encode_text(["fine", None]), "item(s) 1 (NoneType)")
    refuses(lambda: model.encode_image([]), "images is empty")
    refuses(lambda: create_model("huge"), "Unknown config 'huge'")
    refuses(lambda: model.top_words(vt), "one vector of shape")


# --- 77_multinode: a machine's place in a run ---

@pytest.mark.parametrize("args, message", [
    ((2, -1, "node0", 29500), "machine_rank must be in"),
    ((2, 1, "node0"), "main_port must be given for 2 machines"),
    ((2, 1, " ", 29500), "main_address must be given"),
    ((0,), "num_machines must be >= 1"),
    ((2, "1", "node0", 29500), "Machines.machine_rank must be an integer"),
])
def test_machines_refuse_a_bad_place(args, message) -> None:
    from lexvla.multinode import Machines
    refuses(lambda: Machines(*args), message)


# --- 79_search: vectors, ids and the index ---

WORDS = ["red", "star", "blue", "ring", "big", "image"]
DOCS = torch.tensor([[0.8, 0.5, 0.0, 0.0, 0.3, 0.1], [0.0, 0.0, 0.9, 0.4, 0.0, 0.2], [0.6, 0.0, 0.0, 0.7, 0.0, 0.4]])


def test_vectors_and_ids_are_checked() -> None:
    from lexvla.search import check_ids, check_vectors
    refuses(lambda: check_vectors(-DOCS, 6), "negative values (row 0)")
    refuses(lambda: check_vectors(DOCS.masked_fill(DOCS == 0.4, float("nan")), 6), "NaN or infinite values (row 1)")
    refuses(lambda: check_vectors(DOCS.numpy(), 6), "must be a torch.Tensor")
    refuses(lambda: check_ids(["a", "b", "a"], 3), "duplicated ids in this batch: ['a']")
    refuses(lambda: check_ids(["a", "", "c"], 3), "non-empty strings")


def test_the_index_refuses_bad_adds_and_searches_and_changes_nothing(tmp_path: Path) -> None:
    from lexvla.search import META, LexicalIndex
    path = tmp_path / "toy"
    with LexicalIndex(WORDS, path, top_k=2) as ix: ix.add(["star", "blue ring", "red ring"], DOCS)
    ix = LexicalIndex.open(path)
    refuses(lambda: ix.add(["x"], -torch.ones(1, 6)), "negative values")
    refuses(lambda: ix.add(["x"], torch.full((1, 6), float("nan"))), "NaN")
    refuses(lambda: ix.add(["x", "y"], torch.ones(1, 6)), "2 ids for 1 vectors")
    refuses(lambda: ix.add(["x", "x"], torch.ones(2, 6)), "duplicated ids in this batch: ['x']")
    refuses(lambda: ix.add(["star"], torch.ones(1, 6)), "ids already in the index: ['star']")
    refuses(lambda: ix.add(["x"], torch.zeros(1, 6)), "no word left after sparsification")
    refuses(lambda: ix.search(torch.zeros(6)), "query 0 has no active word")
    refuses(lambda: ix.search(torch.tensor([1.0, 1, 0, 0, 0, 0]), k=0), "k must be a positive integer")
    assert len(ix) == 3                                         # nothing of the refused adds was stored
    ix.close()
    refuses(lambda: LexicalIndex(WORDS, path), "already holds a lexical index")
    refuses(lambda: LexicalIndex.open(tmp_path / "nothing"), "no lexical index")
    (tmp_path / "empty").mkdir()
    refuses(lambda: LexicalIndex.open(tmp_path / "empty"), f"{META} is missing")
    shutil.copytree(path, tmp_path / "broken"); (tmp_path / "broken" / META).write_text("{not json")
    refuses(lambda: LexicalIndex.open(tmp_path / "broken"), "is not valid JSON")
