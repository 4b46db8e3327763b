"""The text source's token cache: loading a corpus from the cache against tokenizing it, in the
same run (the baseline is the first, uncached load of the same files and tokenizer).

The corpus is CPython's standard library source (real text on every machine), a BPE tokenizer
is trained on it with `tokenizers`, and `load_data({source: text, ...})` is timed cold (the
cache empty: read, tokenize, pack, write) and warm (the key hashed, the blocks read).
Run: .venv/bin/python bench/text_cache.py [--megabytes 4] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sysconfig
import tempfile
import time
from pathlib import Path


def corpus(folder: Path, megabytes: float) -> int:
    """Stdlib modules copied as .txt files until ``megabytes``; returns the bytes written."""
    written = 0
    for source in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        text = source.read_text(encoding="utf-8", errors="replace")
        (folder / f"{source.stem}.txt").write_text(text, encoding="utf-8")
        written += len(text.encode())
        if written >= megabytes * 1e6:
            break
    return written


def tokenizer(folder: Path, files: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    trained = Tokenizer(models.BPE(unk_token="<unk>"))
    trained.pre_tokenizer = pre_tokenizers.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=4096, special_tokens=["<unk>", "</s>"])
    trained.train([str(p) for p in sorted(files.glob("*.txt"))], trainer)
    trained.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>"}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--megabytes", type=float, default=4.0)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    from mergecli.data import load_data

    with tempfile.TemporaryDirectory() as root:
        root = Path(root)
        (root / "text").mkdir()
        size = corpus(root / "text", args.megabytes)
        tokenizer(root, root / "text")
        os.environ["MERGECLI_CACHE"] = str(root / "cache")
        spec = {"source": "text", "path": str(root / "text"), "tokenizer": str(root),
                "seq_len": 256}  # fmt: skip
        cold, warm = [], []
        for _ in range(args.repeats):
            for entry in (root / "cache" / "text").glob("*"):
                entry.unlink()
            start = time.perf_counter()
            data = load_data(spec)
            cold.append(time.perf_counter() - start)
            start = time.perf_counter()
            again = load_data(spec)
            warm.append(time.perf_counter() - start)
            assert (again.x == data.x).all()
        tokens = data.x.numel()
        cold_s, warm_s = statistics.median(cold), statistics.median(warm)
        print(f"corpus: {size / 1e6:.1f} MB, {len(data)} blocks of 256 = {tokens} tokens")
        print(f"{'load':28} {'median s':>9} {'x tokenize':>11}")
        print(f"{'tokenize (cache empty)':28} {cold_s:9.3f} {1.0:11.2f}")
        print(f"{'from the cache':28} {warm_s:9.3f} {warm_s / cold_s:11.3f}")


if __name__ == "__main__":
    main()
