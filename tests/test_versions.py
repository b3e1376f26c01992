"""The version ranges in settings.ini: each has a lower end that tests/compat.py can install, an environment outside
them stops `import lexvla` with an error naming the package and its range, and the compatibility step says SKIPPED
(never a silent pass) when the package index cannot be reached."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
import compat  # noqa: E402
import run_nbs  # noqa: E402


def test_every_requirement_has_a_lower_bound():
    "The lowest end is defined for every runtime requirement (and every optional extra a user installs)."
    for key in ("requirements", "server_requirements"):
        pins = compat.lowest_pins(compat.requirements(key=key))
        assert len(pins) == len(compat.requirements(key=key)) and all("==" in p for p in pins), pins


def test_lowest_pins():
    assert compat.lowest_pins(["torch>=2.13,<2.14", "qdrant-edge-py==0.9.0", "fastcore<2,>=1.8", "a~=1.4.2",
                               "b>=1.0,>=1.2"]) == \
        ["torch==2.13", "qdrant-edge-py==0.9.0", "fastcore==1.8", "a==1.4.2", "b==1.2"]
    with pytest.raises(ValueError, match="without a lower bound.*: tqdm, numpy<3"):
        compat.lowest_pins(["tqdm", "numpy<3", "peft>=0.21"])


def test_compare_numbers():
    ref = {"smol": {"image": [0.5, 0.25], "captions": [[0.1, 0.2]], "similarities": [0.3]}}
    same = {"smol": {"image": [0.5, 0.25 + 1e-7], "captions": [[0.1, 0.2]], "similarities": [0.3]}}
    assert compat.compare(ref, same) == []
    off = {"smol": {"image": [0.5, 0.26], "captions": [[0.1, 0.2]], "similarities": [0.3]}}
    assert len(compat.compare(ref, off)) == 1 and "image differ" in compat.compare(ref, off)[0]


def _import_lexvla(tmp_path: Path, fake: dict[str, str], code: str = "import lexvla.text", **env: str):
    "Run `code` in a subprocess whose metadata reports the `fake` {distribution: version} (shadowing dist-info folders)."
    for name, version in fake.items():
        d = tmp_path / f"{name.replace('-', '_')}-{version}.dist-info"
        d.mkdir()
        (d / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    e = {**os.environ, "PYTHONPATH": str(tmp_path), **env}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=e, cwd=tmp_path, timeout=300)


def test_import_outside_the_ranges_names_the_package_and_range(tmp_path):
    "transformers 5.23 (its `cache` argument is missing) and torch 2.14: stopped at `import lexvla`, before transformers is imported."
    p = _import_lexvla(tmp_path, {"transformers": "5.23.0", "torch": "2.14.1"},
                       "import sys\ntry: import lexvla.text\nexcept ImportError: print(sorted(m for m in sys.modules if m.split('.')[0] "
                       "in ('transformers', 'torch'))); raise")
    assert p.returncode != 0
    assert "lexvla.UnsupportedVersionError" in p.stderr, p.stderr[-2000:]
    assert "transformers 5.23.0 is installed; lexvla needs transformers<6,>=5.24" in p.stderr
    assert "torch 2.14.1 is installed; lexvla needs torch<2.14,>=2.11" in p.stderr
    assert "site-packages/transformers" not in p.stderr and p.stdout.strip() == "[]", (p.stdout, p.stderr[-2000:])


def test_import_inside_the_ranges_and_the_escape_hatch(tmp_path):
    (tmp_path / "a").mkdir(); (tmp_path / "b").mkdir()
    p = _import_lexvla(tmp_path / "a", {})
    assert p.returncode == 0, p.stderr[-2000:]
    p = _import_lexvla(tmp_path / "b", {"peft": "0.22.0"}, "import lexvla; print(lexvla.__version__)", LEXVLA_SKIP_VERSION_CHECK="1")
    assert p.returncode == 0 and p.stdout.strip() == "0.1.0", p.stderr[-2000:]
    assert "RuntimeWarning" in p.stderr and "peft 0.22.0 is installed; lexvla needs peft<0.22,>=0.21" in p.stderr


def test_compat_without_the_index_says_skipped(tmp_path):
    "No reachable index: SKIPPED in a banner, exit 0; with COMPAT_STRICT=1, exit 1. Nothing is installed."
    env = {**os.environ, "PIP_CONFIG_FILE": os.devnull, "PIP_INDEX_URL": "http://127.0.0.1:9/simple",
           "PIP_EXTRA_INDEX_URL": "", "PIP_FIND_LINKS": "", "PIP_RETRIES": "0", "PIP_TIMEOUT": "3"}
    cmd = [sys.executable, str(ROOT / "tests" / "compat.py"), "--dir", str(tmp_path / "envs"), "newest", "lowest"]
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 0 and "SKIPPED: compatibility smoke test (newest, lowest)" in p.stdout, p.stdout + p.stderr
    assert not (tmp_path / "envs").exists()
    p = subprocess.run(cmd, capture_output=True, text=True, env={**env, "COMPAT_STRICT": "1"}, timeout=300)
    assert p.returncode == 1 and "SKIPPED" in p.stdout


def test_no_deprecation_notice_is_filtered():
    "Deprecations are fixed, not hidden: `make run-nbs` filters no FutureWarning or DeprecationWarning."
    filters = run_nbs.ENV["PYTHONWARNINGS"].split(",")
    assert not [f for f in filters if "Deprecation" in f or "FutureWarning" in f or "deprecat" in f.lower()], filters
