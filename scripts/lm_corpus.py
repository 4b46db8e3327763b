"""Regenerate the language-model demo's text bundle (data/text/) from two sources nobody here
wrote: English fortunes from Debian's ``fortunes`` package (BSD licence) and Python code from the
CPython 3.11 standard library (PSF licence).

    python scripts/lm_corpus.py [--out data/text] [--fortunes DIR] [--python-lib DIR]

Writes ``<domain>/{train,eval}.txt`` for english and code, ``mixed-fit.txt`` (held out from both:
no model is trained on it, the merges fit on it), the licence texts and README.md. Documents are
separated by one blank line and contain none. The same sources give the same bytes: every choice
is made in the order of SHA-256 hashes, never by a random generator or the file system's order.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import re
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FORTUNES = Path("/usr/share/games/fortunes")
FORTUNES_COPYRIGHT = Path("/usr/share/doc/fortunes/copyright")
PYTHON_LIB = Path("/root/.pyenv/versions/3.11.7/lib/python3.11")

# Prose and quotations; the files about computers, Linux and Perl are left out so that the
# English domain and the code domain share as little as possible, and those about ethnicity,
# politics, drugs and the sexes because a demo needs none of them.
FORTUNE_FILES = (
    *("art", "education", "food", "humorists", "kids", "law", "love", "medicine"),
    *("miscellaneous", "people", "pets", "platitudes", "science", "sports", "wisdom", "work"),
)

# Bytes per split and domain: eval is ~12% of each domain, the fit sample is held out too.
BUDGET = {"eval": 40_000, "fit": 60_000, "train": 260_000}
# Hash buckets (of 100) per split: fortunes split one by one, code module by module (so that no
# eval function's neighbours were trained on).
BUCKETS = {"eval": range(0, 12), "fit": range(12, 20), "train": range(20, 100)}
# At most this many bytes from one module, so that the code domain spans many modules.
MODULE_CAP = 5_000
BLOCK_BYTES = (150, 3_000)
FORTUNE_BYTES = (40, 1_500)


def sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def bucket(key: str) -> int:
    return int(sha(key)[:8], 16) % 100


def split_of(key: str) -> str:
    return next(name for name, buckets in BUCKETS.items() if bucket(key) in buckets)


def clean_fortune(raw: str) -> str:
    # Overstrike (c BACKSPACE c for bold, _ BACKSPACE c for underline) keeps the last character.
    text = re.sub(r".\x08", "", raw)
    text = "".join(ch for ch in text if ch == "\n" or ch == "\t" or ch.isprintable())
    lines = [line.expandtabs(4).rstrip() for line in text.splitlines()]
    return "\n".join(line for line in lines if line)


def is_prose(text: str) -> bool:
    """Fortunes that are mostly words (not ASCII art, tables or lists of symbols)."""
    if not FORTUNE_BYTES[0] <= len(text.encode()) <= FORTUNE_BYTES[1]:
        return False
    wordy = sum(ch.isalpha() or ch in " \n.,;:'\"!?-" for ch in text)
    return wordy >= 0.9 * len(text)


def fortunes(directory: Path) -> list[str]:
    """Every distinct prose fortune of FORTUNE_FILES (entries end at a line holding ``%``)."""
    seen: dict[str, None] = {}
    for name in FORTUNE_FILES:
        raw = (directory / name).read_text(encoding="utf-8")
        for entry in re.split(r"^%$", raw, flags=re.MULTILINE):
            text = clean_fortune(entry)
            if text and is_prose(text):
                seen.setdefault(text, None)
    return list(seen)


def code_blocks(path: Path) -> list[str]:
    """The module's top-level functions and classes (with their decorators), blank lines removed."""
    source = path.read_text(encoding="utf-8")
    lines = source.splitlines()
    blocks = []
    for node in ast.parse(source).body:
        if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            continue
        first = min([node.lineno, *(d.lineno for d in node.decorator_list)])
        body = [line.expandtabs(4).rstrip() for line in lines[first - 1 : node.end_lineno]]
        text = "\n".join(line for line in body if line)
        if BLOCK_BYTES[0] <= len(text.encode()) <= BLOCK_BYTES[1]:
            blocks.append(text)
    return blocks


def take(documents: Iterable[str], budget: int) -> list[str]:
    """Documents in the given order until ``budget`` bytes (the last one may overshoot)."""
    chosen, size = [], 0
    for doc in documents:
        if size >= budget:
            break
        chosen.append(doc)
        size += len(doc.encode()) + 2
    return chosen


def english_splits(directory: Path) -> dict[str, list[str]]:
    docs = sorted(fortunes(directory), key=sha)
    return {
        split: take((d for d in docs if split_of(d) == split), budget)
        for split, budget in BUDGET.items()
    }


def code_splits(lib: Path) -> dict[str, list[str]]:
    # Top-level modules only (no packages, no tests), in hash order of their names.
    modules = sorted(
        (p for p in lib.glob("*.py") if not p.name.startswith(("_", "test"))),
        key=lambda p: sha(p.name),
    )
    splits: dict[str, list[str]] = {}
    seen: set[str] = set()  # a block copied into two modules goes to the first split only
    for split, budget in BUDGET.items():
        chosen: list[str] = []
        size = 0
        for module in (m for m in modules if split_of(m.name) == split):
            if size >= budget:
                break
            taken = take((b for b in code_blocks(module) if b not in seen), MODULE_CAP)
            seen.update(taken)
            chosen += taken
            size += sum(len(doc.encode()) + 2 for doc in taken)
        splits[split] = chosen
    return splits


def interleave(*lists: list[str]) -> list[str]:
    out = []
    for i in range(max(map(len, lists))):
        out += [docs[i] for docs in lists if i < len(docs)]
    return out


def write_docs(path: Path, docs: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n\n".join(docs) + "\n", encoding="utf-8")


def fortunes_version() -> str:
    try:
        found = subprocess.run(
            ["dpkg-query", "-W", "-f", "${Version}", "fortunes"],
            capture_output=True,
            text=True,
            check=True,
        )
    except (OSError, subprocess.CalledProcessError):
        return "unknown (dpkg-query could not tell)"
    return found.stdout.strip()


def python_version(lib: Path) -> str:
    # The patch level is in the pyenv path (…/versions/3.11.7/lib/python3.11); the bytes come
    # from that tree, whichever Python runs this script.
    match = re.search(r"/versions/([\d.]+)/", str(lib))
    return match.group(1) if match else lib.name.removeprefix("python")


def readme(sizes: dict[str, int], fortunes_v: str, python_v: str) -> str:
    rows = "\n".join(f"| `{name}` | {size:,} |" for name, size in sizes.items())
    files = ", ".join(FORTUNE_FILES)
    return f"""# Text for the language-model demo

Generated by `python scripts/lm_corpus.py` (deterministic: rerun it to check that these files are
what it writes). Documents are separated by one blank line; `eval.txt` and `mixed-fit.txt` share
no document with any `train.txt`, nor with each other.

| file | bytes |
|---|---|
{rows}

## english/: Debian package `fortunes` {fortunes_v}

Fortune cookies (quotations, jokes, aphorisms) from the files {files} of
`/usr/share/games/fortunes/` (the package's non-offensive set; `fortunes-off` is not used).
Overstrike is removed, tabs become spaces, blank lines inside a fortune are dropped, and only
fortunes that are mostly words are kept. Licence: BSD (University of California), with the
package's copyright notice in `english/COPYRIGHT` as the licence requires.

## code/: the CPython {python_v} standard library

Top-level functions and classes of the standard library's top-level modules
(`lib/python3.11/*.py`, no packages, tests or private modules), blank lines removed, at most
{MODULE_CAP:,} bytes per module; eval, fit and train use different modules. Licence: Python
Software Foundation License Version 2, copied in `code/LICENSE` as the licence requires.

## mixed-fit.txt

The held-out fit documents of both domains, alternating (english first): the sample the merges
learn their coefficients on.
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "data" / "text")
    parser.add_argument("--fortunes", type=Path, default=FORTUNES)
    parser.add_argument("--fortunes-copyright", type=Path, default=FORTUNES_COPYRIGHT)
    parser.add_argument("--python-lib", type=Path, default=PYTHON_LIB)
    args = parser.parse_args(argv)
    for path in (args.fortunes, args.fortunes_copyright, args.python_lib / "LICENSE.txt"):
        if not path.exists():
            print(f"error: {path} not found (apt-get install fortunes; CPython 3.11.7)")
            return 1

    domains = {"english": english_splits(args.fortunes), "code": code_splits(args.python_lib)}
    out: Path = args.out
    for domain, splits in domains.items():
        write_docs(out / domain / "train.txt", splits["train"])
        write_docs(out / domain / "eval.txt", splits["eval"])
    write_docs(out / "mixed-fit.txt", interleave(domains["english"]["fit"], domains["code"]["fit"]))
    (out / "english" / "COPYRIGHT").write_text(args.fortunes_copyright.read_text())
    (out / "code" / "LICENSE").write_text((args.python_lib / "LICENSE.txt").read_text())

    names = [f"{d}/{s}.txt" for d in domains for s in ("train", "eval")] + ["mixed-fit.txt"]
    sizes = {name: (out / name).stat().st_size for name in names}
    text = readme(sizes, fortunes_version(), python_version(args.python_lib))
    (out / "README.md").write_text(text)
    for name, size in sizes.items():
        print(f"{name}: {size:,} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
