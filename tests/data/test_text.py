"""The `text` source: documents, tokens, packing, the cache, and bad input (one line each)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors import safe_open
from torch import nn

from helpers import stdlib_text, train_tokenizer
from mergecli.data import load_data
from mergecli.data import text as text_source
from mergecli.data.batches import TensorData
from mergecli.data.model_check import DataUse, check_against_model, check_shape_against_model
from mergecli.errors import MergeCliError

pytest.importorskip("tokenizers")


@pytest.fixture(autouse=True)
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test's cache in its own tmp_path, never the user's home."""
    folder = tmp_path / "cache"
    monkeypatch.setenv("MERGECLI_CACHE", str(folder))
    return folder / "text"


@pytest.fixture(scope="module")
def corpus() -> str:
    return stdlib_text(12000)


@pytest.fixture
def tokenizer_dir(tmp_path: Path, corpus: str) -> Path:
    return train_tokenizer(tmp_path / "tok", corpus)


def paragraphs(corpus: str) -> list[str]:
    """The corpus's blank-line-separated paragraphs, as a reader of the format splits them."""
    out, current = [], []
    for line in corpus.splitlines() + [""]:
        if line.strip():
            current.append(line)
        elif current:
            out.append("\n".join(current))
            current = []
    return out


def expected_tokens(tokenizer_dir: Path, documents: list[str]) -> torch.Tensor:
    """Each document's ids and EOS, concatenated, computed with tokenizers directly."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    eos = tokenizer.token_to_id("</s>")
    ids = [i for d in documents for i in [*tokenizer.encode(d).ids, eos]]
    return torch.tensor(ids, dtype=torch.int64)


def spec(path: Path, tokenizer: Path, **extra) -> dict:
    return {"source": "text", "path": str(path), "tokenizer": str(tokenizer), **extra}


def test_txt_documents_are_tokenized_with_eos_and_packed(
    tmp_path: Path, corpus: str, tokenizer_dir: Path
) -> None:
    path = tmp_path / "a.txt"
    path.write_text(corpus)
    data = load_data(spec(path, tokenizer_dir, seq_len=32))
    tokens = expected_tokens(tokenizer_dir, paragraphs(corpus))
    blocks = len(tokens) // 32
    assert blocks > 10 and data.x.dtype == torch.int64 and data.x.shape == (blocks, 32)
    assert torch.equal(data.x.flatten(), tokens[: blocks * 32])  # the remainder dropped
    assert torch.equal(data.y, torch.zeros(blocks, dtype=torch.int64))


def test_jsonl_field_and_a_directory_read_recursively_in_order(
    tmp_path: Path, corpus: str, tokenizer_dir: Path
) -> None:
    docs = paragraphs(corpus)
    folder = tmp_path / "corpus"
    (folder / "b").mkdir(parents=True)
    (folder / "a.txt").write_text("\n\n".join(docs[:10]))
    lines = [json.dumps({"body": d, "id": i}) for i, d in enumerate(docs[10:20])]
    (folder / "b" / "c.jsonl").write_text("\n".join(lines) + "\n\n")
    (folder / "b" / "notes.md").write_text("not read")
    (folder / "c.txt").write_text("\n\n".join(docs[20:]))
    data = load_data(spec(folder, tokenizer_dir, seq_len=16, field="body"))
    # sorted by path inside the folder: a.txt, b/c.jsonl, c.txt
    tokens = expected_tokens(tokenizer_dir, docs)
    assert torch.equal(data.x.flatten(), tokens[: len(data) * 16])
    assert len(data) == len(tokens) // 16


def test_max_tokens_and_fraction(tmp_path: Path, corpus: str, tokenizer_dir: Path) -> None:
    path = tmp_path / "a.txt"
    path.write_text(corpus)
    capped = load_data(spec(path, tokenizer_dir, seq_len=10, max_tokens=105))
    tokens = expected_tokens(tokenizer_dir, paragraphs(corpus))
    assert torch.equal(capped.x.flatten(), tokens[:100])
    whole = load_data(spec(path, tokenizer_dir, seq_len=10))
    half = load_data(spec(path, tokenizer_dir, seq_len=10, fraction=0.5), seed=3)
    assert len(half) == round(len(whole) / 2)
    rows = {tuple(r) for r in whole.x.tolist()}
    assert all(tuple(r) in rows for r in half.x.tolist())


def test_second_load_comes_from_the_cache_and_a_changed_file_misses(
    tmp_path: Path, corpus: str, tokenizer_dir: Path, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "a.txt"
    path.write_text(corpus)
    first = load_data(spec(path, tokenizer_dir, seq_len=32))
    [saved] = list(cache.iterdir())
    assert saved.suffix == ".safetensors"
    with safe_open(str(saved), framework="pt") as f:  # safetensors, never a pickle
        assert torch.equal(f.get_tensor("blocks"), first.x)

    def no_tokenizer(*_args):
        raise AssertionError("tokenized again")

    monkeypatch.setattr(text_source, "load_tokenizer", no_tokenizer)
    again = load_data(spec(path, tokenizer_dir, seq_len=32))
    assert torch.equal(again.x, first.x)
    moved = tmp_path / "moved.txt"  # the key is the bytes, not the path
    moved.write_text(corpus)
    assert torch.equal(load_data(spec(moved, tokenizer_dir, seq_len=32)).x, first.x)

    path.write_text(corpus.replace("text", "TEXT"))
    with pytest.raises(AssertionError, match="tokenized again"):
        load_data(spec(path, tokenizer_dir, seq_len=32))
    with pytest.raises(AssertionError, match="tokenized again"):  # seq_len is in the key too
        load_data(spec(moved, tokenizer_dir, seq_len=16))


def test_cache_false_writes_nothing_and_cache_dir_is_used(
    tmp_path: Path, corpus: str, tokenizer_dir: Path, cache: Path
) -> None:
    path = tmp_path / "a.txt"
    path.write_text(corpus)
    load_data(spec(path, tokenizer_dir, cache=False))
    assert not cache.exists()
    load_data(spec(path, tokenizer_dir, cache=str(tmp_path / "mine")))
    assert len(list((tmp_path / "mine").glob("*.safetensors"))) == 1


def test_key_depends_on_inputs_not_on_paths(tmp_path: Path, tokenizer_dir: Path) -> None:
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("one two\n\nthree")
    b.write_text("one two\n\nthree")

    def key(path: Path, **extra) -> str:
        return text_source.cache_key(
            text_source.text_options(spec(path, tokenizer_dir, **extra), "d")
        )

    assert key(a) == key(b)
    assert key(a) != key(a, seq_len=8) != key(a, max_tokens=100)
    assert key(a) != key(a, field="body")
    config = tokenizer_dir / "tokenizer_config.json"
    before = key(a)
    config.write_text(json.dumps({"eos_token": "<unk>"}))
    assert key(a) != before


def test_empty_file_is_named(tmp_path: Path, tokenizer_dir: Path) -> None:
    folder = tmp_path / "corpus"
    folder.mkdir()
    (folder / "a.txt").write_text("some text here\n")
    (folder / "b.txt").write_text("\n  \n")
    with pytest.raises(MergeCliError, match=r"b\.txt holds no text") as error:
        load_data(spec(folder, tokenizer_dir, seq_len=2), where="data.fit")
    assert str(error.value).startswith("data.fit.path: ") and "\n" not in str(error.value)


@pytest.mark.parametrize(
    ("line", "needle"),
    [
        ("{not json", r"c\.jsonl:2: not a JSON object"),
        ('["a list"]', r"c\.jsonl:2: a JSON list, not an object"),
        ('{"body": "x"}', r"data\.fit\.field: .*c\.jsonl:2: no field 'text' \(fields: body\)"),
        ('{"text": 3}', r"c\.jsonl:2: field 'text' is a int, not a string"),
    ],
)
def test_bad_jsonl_line_names_file_and_line(
    tmp_path: Path, tokenizer_dir: Path, line: str, needle: str
) -> None:
    path = tmp_path / "c.jsonl"
    path.write_text('{"text": "fine"}\n' + line + "\n")
    with pytest.raises(MergeCliError, match=needle):
        load_data(spec(path, tokenizer_dir, seq_len=2), where="data.fit")


def test_tokenizer_missing_says_where_it_looked(tmp_path: Path, corpus: str) -> None:
    path = tmp_path / "a.txt"
    path.write_text(corpus)
    with pytest.raises(MergeCliError, match=r"data\.eval\.tokenizer: no tokenizer found: looked "
                       rf"for {tmp_path / 'model' / 'tokenizer.json'}"):  # fmt: skip
        (tmp_path / "model").mkdir()
        load_data(spec(path, tmp_path / "model"), where="data.eval")
    with pytest.raises(MergeCliError, match=r"needs a tokenizer"):
        load_data({"source": "text", "path": str(path)}, where="data.eval")


def test_too_few_tokens_for_one_block(tmp_path: Path, tokenizer_dir: Path) -> None:
    path = tmp_path / "a.txt"
    path.write_text("a few words\n")
    with pytest.raises(MergeCliError, match=r"a\.txt hold \d+ tokens, fewer than one block of "
                       "seq_len 256; lower seq_len or add text"):  # fmt: skip
        load_data(spec(path, tokenizer_dir))


def test_class_options_are_refused(tmp_path: Path, tokenizer_dir: Path) -> None:
    path = tmp_path / "a.txt"
    path.write_text("words\n")
    for option in ({"classes": [0]}, {"balanced": True}):
        with pytest.raises(MergeCliError, match="source 'text' has no classes"):
            load_data(spec(path, tokenizer_dir, **option))


def test_tokenizers_not_installed_is_one_line(
    tmp_path: Path, tokenizer_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "a.txt"
    path.write_text("words\n")
    monkeypatch.setitem(sys.modules, "tokenizers", None)  # import raises ImportError
    with pytest.raises(MergeCliError, match=r"pip install 'mergecli\[hf\]'"):
        load_data(spec(path, tokenizer_dir, cache=False))


def test_default_tokenizer_is_the_reference_model_directory(tmp_path: Path) -> None:
    raw = {"source": "text", "path": "a.txt"}
    (tmp_path / "model").mkdir()
    filled = text_source.with_default_tokenizer(raw, tmp_path / "model")
    assert filled["tokenizer"] == str(tmp_path / "model")
    assert text_source.with_default_tokenizer(raw, tmp_path / "m.safetensors") == raw
    own = {**raw, "tokenizer": "t.json"}
    assert text_source.with_default_tokenizer(own, tmp_path / "model") == own


class TokenModel(nn.Module):
    """A token model with a Hugging Face style config (positions) and one embedding."""

    def __init__(self, vocabulary: int = 20, positions: int = 8) -> None:
        super().__init__()
        self.config = SimpleNamespace(max_position_embeddings=positions)
        self.embed = nn.Embedding(vocabulary, 4)
        self.head = nn.Linear(4, vocabulary)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(ids))


USE = DataUse("data.fit", "text a.txt", "tiny")


def test_token_ids_beyond_the_vocabulary_are_refused() -> None:
    x = torch.randint(0, 20, (6, 8))
    check_against_model(TensorData(x, torch.zeros(6, dtype=torch.int64)), TokenModel(), USE)
    x[4, 3] = 25
    with pytest.raises(MergeCliError, match=r"data\.fit \(text a\.txt\): token id 25 in row 4 is "
                       r"not in the vocabulary of model tiny, which embeds 20 tokens"):  # fmt: skip
        check_against_model(TensorData(x, torch.zeros(6, dtype=torch.int64)), TokenModel(), USE)


def test_sequences_longer_than_the_positions_are_refused() -> None:
    x = torch.randint(0, 20, (2, 9))
    message = r"sequences of 9 tokens are longer .*max_position_embeddings 8\); set seq_len"
    with pytest.raises(MergeCliError, match=message):
        check_against_model(TensorData(x, torch.zeros(2, dtype=torch.int64)), TokenModel(), USE)
    with pytest.raises(MergeCliError, match=message):  # validate: on the meta device
        check_shape_against_model([9], TokenModel, USE, torch.int64)
    check_shape_against_model([8], TokenModel, USE, torch.int64)
