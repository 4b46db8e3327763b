"""The language-model demo's text bundle (data/text/): what scripts/lm_corpus.py writes, with
held-out eval and fit documents and the sources' licences beside it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent.parent
TEXT = ROOT / "data" / "text"
SCRIPT = ROOT / "scripts" / "lm_corpus.py"
DOMAINS = ("english", "code")
FILES = [f"{d}/{s}.txt" for d in DOMAINS for s in ("train", "eval")] + ["mixed-fit.txt"]
SOURCES = (
    Path("/usr/share/games/fortunes/wisdom"),
    Path("/usr/share/doc/fortunes/copyright"),
    Path("/root/.pyenv/versions/3.11.7/lib/python3.11/LICENSE.txt"),
)


def documents(name: str) -> list[str]:
    text = (TEXT / name).read_text(encoding="utf-8")
    assert text.endswith("\n") and not text.endswith("\n\n"), name
    return text[:-1].split("\n\n")


def test_bundle_is_what_the_script_writes(tmp_path: Path) -> None:
    missing = [str(p) for p in SOURCES if not p.exists()]
    if missing:
        pytest.skip(f"sources not installed here: {', '.join(missing)}")
    subprocess.run([sys.executable, str(SCRIPT), "--out", str(tmp_path)], check=True)
    written = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
    bundled = sorted(p.relative_to(TEXT) for p in TEXT.rglob("*") if p.is_file())
    assert written == bundled
    for name in written:
        assert (tmp_path / name).read_bytes() == (TEXT / name).read_bytes(), name


def test_eval_and_fit_documents_are_held_out() -> None:
    train = {d: set(documents(f"{d}/train.txt")) for d in DOMAINS}
    evals = {d: set(documents(f"{d}/eval.txt")) for d in DOMAINS}
    fit = set(documents("mixed-fit.txt"))
    seen_in_training = train["english"] | train["code"]
    for domain in DOMAINS:
        assert not evals[domain] & seen_in_training, domain
        assert not evals[domain] & fit, domain
    assert not fit & seen_in_training
    # Mixed: the fit sample draws on both domains, alternating, english first.
    fit_docs = documents("mixed-fit.txt")
    code_like = [doc.startswith(("def ", "class ", "@", "async def ")) for doc in fit_docs]
    assert not code_like[0] and code_like[1]
    code_bytes = sum(len(doc) for doc, code in zip(fit_docs, code_like, strict=True) if code)
    assert 0.3 < code_bytes / sum(map(len, fit_docs)) < 0.7


def test_sizes_and_shares() -> None:
    for domain in DOMAINS:
        train = (TEXT / domain / "train.txt").stat().st_size
        held_out = (TEXT / domain / "eval.txt").stat().st_size
        assert 200_000 < train + held_out < 500_000, domain  # "a few hundred KB per domain"
        assert 0.10 <= held_out / (train + held_out) <= 0.15, domain
    assert 50_000 < (TEXT / "mixed-fit.txt").stat().st_size < 150_000


def test_readme_names_each_file_and_the_licences_are_beside_them() -> None:
    readme = " ".join((TEXT / "README.md").read_text().split())
    for name in FILES:
        assert f"`{name}`" in readme, name
    assert "BSD" in readme and "Python Software Foundation License" in readme
    assert (
        "Redistribution and use in source and binary forms"
        in (TEXT / "english" / "COPYRIGHT").read_text()
    )
    assert "PYTHON SOFTWARE FOUNDATION LICENSE VERSION 2" in (TEXT / "code" / "LICENSE").read_text()
