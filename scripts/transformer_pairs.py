"""Train the transformer pairs of issue 19: two copies of each of four Hugging Face architectures,
from different seeds (initialisation and data order), for merging after alignment.

    python scripts/transformer_pairs.py [--out runs/transformers] [--only bert gpt2 llama vit]
                                        [--seeds 0 1] [--tiny]

- ``bert``: ``BertForSequenceClassification`` says whether a short window of text (``window``
  tokens of the bundled data/text/, decoded back to text) is English or Python code. The windows
  are written as parquet files (``OUT/data/bert-windows/{train,eval}.parquet``, columns ``text``
  and ``label``, a ``ClassLabel``: english, code), and the models are trained on them as the
  recipes' ``hf_dataset`` source reads them (``[CLS] window [SEP]``, padded, with a mask).
- ``gpt2`` (``GPT2LMHeadModel``, tied embeddings) and ``llama`` (``LlamaForCausalLM``: RoPE,
  RMSNorm, gated MLP, 2 key-value heads for 4 query heads): causal language models on both
  domains' training text, as scripts/lm_demo.py pre-trains its base.
- ``vit``: ``ViTForImageClassification`` (28x28 images, 7x7 patches, 1 channel) on the bundled
  MNIST's ``train`` split (8,000 images), as the ``mnist`` source normalises them.

Each is small (hidden size 64, 2 layers, 4 heads), trained with plain torch on the CPU (AdamW,
warm-up and cosine decay, no dropout), deterministic for a given machine and thread count. Writes
Hugging Face model directories ``OUT/<arch>-seed<k>`` (``save_pretrained``: config,
model.safetensors; the tokenizer for the text models; ``training.json``), then ``OUT/<arch>.json``
with each copy's accuracy (bert on the eval windows, vit on MNIST ``test``) or perplexity per
domain (eval text, blocks of ``seq_len`` tokens) and training time. The text models share one
byte-level BPE tokenizer trained as scripts/lm_demo.py trains its own. ``--tiny`` shrinks
everything for the tests (seconds).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import lm_demo  # noqa: E402  (the LM demo's tokenizer, data and training helpers)

ROOT = Path(__file__).resolve().parent.parent
ARCHS = ("bert", "gpt2", "llama", "vit")
DOMAINS = lm_demo.DOMAINS
CLS, SEP, PAD = "[CLS]", "[SEP]", "[PAD]"


@dataclass(frozen=True)
class Sizes:
    vocab: int = 2048
    hidden: int = 64
    intermediate: int = 256
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2  # llama: grouped-query attention
    seq_len: int = 64  # causal LMs' training and evaluation blocks
    window: int = 12  # bert: tokens per text window
    batch: int = 32
    lm_steps: int = 500
    lm_lr: float = 3e-3
    bert_steps: int = 400
    bert_lr: float = 1e-3
    vit_steps: int = 1500
    vit_lr: float = 2e-3
    vit_images: int = 0  # 0: all of MNIST's train split
    max_chars: int = 0  # 0: all of each training file


TINY = Sizes(
    vocab=300,
    hidden=16,
    intermediate=32,
    layers=1,
    heads=2,
    kv_heads=1,
    seq_len=32,  # the recipes read blocks of 64 tokens, the positions 2 x 32
    window=12,  # the recipes read 20 tokens: [CLS], the window, [SEP], padding
    batch=4,
    lm_steps=2,
    bert_steps=2,
    vit_steps=2,
    vit_images=256,
    max_chars=20_000,
)


def text_tokenizer(data: Path, sizes: Sizes):
    """The LM demo's byte-level BPE, trained on both domains' training text."""
    texts = [lm_demo.read(data / d / "train.txt", sizes) for d in DOMAINS]
    lm_sizes = replace(lm_demo.Sizes(), vocab=sizes.vocab, positions=2 * sizes.seq_len)
    return lm_demo.train_tokenizer(texts, lm_sizes)


def bert_tokenizer(tokenizer, max_length: int):
    """The BPE with BERT's special tokens: ``[CLS] text [SEP]`` on encode, ``[PAD]`` to pad."""
    from tokenizers import Tokenizer
    from tokenizers.processors import TemplateProcessing
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
    tok.add_special_tokens([CLS, SEP, PAD])
    tok.post_processor = TemplateProcessing(
        single=f"{CLS} $A {SEP}",
        pair=f"{CLS} $A {SEP} $B:1 {SEP}:1",
        special_tokens=[(CLS, tok.token_to_id(CLS)), (SEP, tok.token_to_id(SEP))],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        cls_token=CLS,
        sep_token=SEP,
        pad_token=PAD,
        unk_token=None,
        model_max_length=max_length,
    )


def windows(tokenizer, path: Path, sizes: Sizes) -> list[str]:
    """Each document's consecutive ``window``-token pieces (its remainder dropped), decoded."""
    from mergecli.data.text import documents

    pieces: list[str] = []
    chars, w = 0, sizes.window
    for document in documents(path, "text", str(path)):
        ids = tokenizer(document, add_special_tokens=False)["input_ids"]
        pieces += [tokenizer.decode(ids[i : i + w]) for i in range(0, len(ids) - w + 1, w)]
        chars += len(document)
        if sizes.max_chars and chars >= sizes.max_chars:
            break
    return pieces


def write_windows(tokenizer, data: Path, out: Path, sizes: Sizes) -> Path:
    """``out/{train,eval}.parquet``: text windows of each domain's file, labelled by domain, as
    many of each domain (the first ones), interleaved."""
    import datasets
    from datasets import ClassLabel, Dataset, Features, Value

    datasets.disable_progress_bars()
    features = Features({"text": Value("string"), "label": ClassLabel(names=list(DOMAINS))})
    out.mkdir(parents=True, exist_ok=True)
    for split in ("train", "eval"):
        size = sizes if split == "train" else replace(sizes, max_chars=0)
        per_domain = [windows(tokenizer, data / d / f"{split}.txt", size) for d in DOMAINS]
        n = min(map(len, per_domain))
        rows = [(w[i], label) for i in range(n) for label, w in enumerate(per_domain)]
        texts, labels = zip(*rows, strict=True)
        table = {"text": list(texts), "label": list(labels)}
        Dataset.from_dict(table, features=features).to_parquet(str(out / f"{split}.parquet"))
    return out


def read_windows(folder: Path, split: str, model_dir: Path, seq_len: int):
    """The windows as the recipes' ``hf_dataset`` source reads them (ids, mask, labels)."""
    from mergecli.data import load_data

    spec = {"source": "hf_dataset", "path": str(folder / f"{split}.parquet"), "text": "text",
            "tokenizer": str(model_dir), "seq_len": seq_len}  # fmt: skip
    data = load_data(spec)
    return data.x, data.mask, data.y


def fit_classifier(model, inputs: dict, labels, sizes: Sizes, steps: int, lr: float, seed: int):
    """Random batches of ``inputs`` (a dict of model arguments, rows aligned with ``labels``)."""

    def loss_of(gen: torch.Generator) -> torch.Tensor:
        rows = torch.randint(0, len(labels), (sizes.batch,), generator=gen)
        return model(**{k: v[rows] for k, v in inputs.items()}, labels=labels[rows]).loss

    return lm_demo.optimise(model, loss_of, steps, lr, seed)


@torch.no_grad()
def accuracy(model, inputs: dict, labels, batch: int = 256) -> float:
    correct = 0
    for i in range(0, len(labels), batch):
        logits = model(**{k: v[i : i + batch] for k, v in inputs.items()}).logits
        correct += int((logits.argmax(-1) == labels[i : i + batch]).sum())
    return correct / len(labels)


def bert(seed: int, sizes: Sizes, ctx: dict):
    from transformers import BertConfig, BertForSequenceClassification

    tokenizer = ctx["bert_tokenizer"]
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=sizes.hidden,
        num_hidden_layers=sizes.layers,
        num_attention_heads=sizes.heads,
        intermediate_size=sizes.intermediate,
        max_position_embeddings=ctx["bert_seq_len"],
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        pad_token_id=tokenizer.pad_token_id,
        num_labels=len(DOMAINS),
        id2label=dict(enumerate(DOMAINS)),
        label2id={d: i for i, d in enumerate(DOMAINS)},
    )
    model = BertForSequenceClassification(config)
    ids, mask, labels = ctx["bert_train"]
    inputs = {"input_ids": ids, "attention_mask": mask}
    loss = fit_classifier(model, inputs, labels, sizes, sizes.bert_steps, sizes.bert_lr, seed)
    ids, mask, labels = ctx["bert_eval"]
    metrics = {"accuracy": accuracy(model, {"input_ids": ids, "attention_mask": mask}, labels)}
    return model, tokenizer, loss, metrics


def causal_lm_metrics(model, ctx: dict, sizes: Sizes) -> dict:
    return {
        f"{d}_perplexity": lm_demo.perplexity(model, ctx["eval_ids"][d], sizes.seq_len)
        for d in DOMAINS
    }


def gpt2(seed: int, sizes: Sizes, ctx: dict):
    from transformers import GPT2Config, GPT2LMHeadModel

    tokenizer = ctx["tokenizer"]
    eos = tokenizer.eos_token_id
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=ctx["positions"],
        n_embd=sizes.hidden,
        n_layer=sizes.layers,
        n_head=sizes.heads,
        n_inner=sizes.intermediate,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=eos,
        eos_token_id=eos,  # no pad token, as GPT-2 has none (the text source pads nothing)
    )
    model = GPT2LMHeadModel(config)
    return causal_lm(model, seed, sizes, ctx)


def llama(seed: int, sizes: Sizes, ctx: dict):
    lm_sizes = replace(
        lm_demo.Sizes(),
        hidden=sizes.hidden,
        intermediate=sizes.intermediate * 2 // 3,  # a gated MLP's size at the same cost
        layers=sizes.layers,
        heads=sizes.heads,
        kv_heads=sizes.kv_heads,
        positions=ctx["positions"],
    )
    model = lm_demo.new_model(ctx["tokenizer"], lm_sizes)
    return causal_lm(model, seed, sizes, ctx)


def causal_lm(model, seed: int, sizes: Sizes, ctx: dict):
    streams = [ctx["train_ids"][d] for d in DOMAINS]
    lm_sizes = replace(lm_demo.Sizes(), batch=sizes.batch, seq_len=sizes.seq_len)
    loss = lm_demo.train(model, streams, sizes.lm_steps, sizes.lm_lr, lm_sizes, seed)
    return model, ctx["tokenizer"], loss, causal_lm_metrics(model, ctx, sizes)


def vit(seed: int, sizes: Sizes, ctx: dict):
    from transformers import ViTConfig, ViTForImageClassification

    from mergecli.data import load_data

    config = ViTConfig(
        image_size=28,
        patch_size=7,
        num_channels=1,
        hidden_size=sizes.hidden,
        num_hidden_layers=sizes.layers,
        num_attention_heads=sizes.heads,
        intermediate_size=sizes.intermediate,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        num_labels=10,
        id2label={i: str(i) for i in range(10)},
        label2id={str(i): i for i in range(10)},
    )
    model = ViTForImageClassification(config)
    train = load_data({"source": "mnist", "split": "train"})
    n = sizes.vit_images or len(train)
    inputs, labels = {"pixel_values": train.x[:n]}, train.y[:n]
    loss = fit_classifier(model, inputs, labels, sizes, sizes.vit_steps, sizes.vit_lr, seed)
    test = load_data({"source": "mnist", "split": "test"})
    metrics = {"accuracy": accuracy(model, {"pixel_values": test.x}, test.y)}
    return model, None, loss, metrics


TRAIN = {"bert": bert, "gpt2": gpt2, "llama": llama, "vit": vit}


def text_context(archs: list[str], data: Path, out: Path, sizes: Sizes) -> dict:
    """What the text models share: the tokenizer, token streams and (bert) the windows."""
    ctx: dict = {}
    if not {"bert", "gpt2", "llama"} & set(archs):
        return ctx
    start = time.perf_counter()
    tokenizer = text_tokenizer(data, sizes)
    ctx["tokenizer"] = tokenizer
    ctx["positions"] = 2 * sizes.seq_len
    if {"gpt2", "llama"} & set(archs):
        ctx["train_ids"] = {d: lm_demo.token_ids(tokenizer, data / d / "train.txt", sizes)
                            for d in DOMAINS}  # fmt: skip
        whole = replace(sizes, max_chars=0)
        ctx["eval_ids"] = {d: lm_demo.token_ids(tokenizer, data / d / "eval.txt", whole)
                           for d in DOMAINS}  # fmt: skip
    if "bert" in archs:
        # [CLS] and [SEP] around a window that may tokenize a few tokens longer than it was cut.
        seq_len = sizes.window + 8
        ctx["bert_seq_len"] = seq_len
        ctx["bert_tokenizer"] = bert_tokenizer(tokenizer, seq_len)
        folder = write_windows(tokenizer, data, out / "data" / "bert-windows", sizes)
        # The hf_dataset source reads the tokenizer from a directory, as a recipe gives it.
        scratch = out / "data" / "bert-tokenizer"
        lm_demo.save_tokenizer(ctx["bert_tokenizer"], scratch)
        ctx["bert_train"] = read_windows(folder, "train", scratch, seq_len)
        ctx["bert_eval"] = read_windows(folder, "eval", scratch, seq_len)
        print(f"bert windows: {len(ctx['bert_train'][2]):,} train, "
              f"{len(ctx['bert_eval'][2]):,} eval, in {folder}")  # fmt: skip
    print(f"tokenizer and text: {time.perf_counter() - start:.1f} s")
    return ctx


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "transformers")
    parser.add_argument("--data", type=Path, default=ROOT / "data" / "text")
    parser.add_argument("--only", nargs="+", choices=ARCHS, default=list(ARCHS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--tiny", action="store_true", help="tiny sizes and steps (tests)")
    args = parser.parse_args(argv)
    sizes = TINY if args.tiny else Sizes()
    if error := lm_demo.missing_hf_extra():
        print(error)
        return 1

    start = time.perf_counter()
    threads = torch.get_num_threads()
    archs = [a for a in ARCHS if a in args.only]
    ctx = text_context(archs, args.data, args.out, sizes)
    for arch in archs:
        results = {}
        for seed in args.seeds:
            t0 = time.perf_counter()
            torch.manual_seed(seed)  # the initialisation; `seed` also orders the batches
            model, tokenizer, loss, metrics = TRAIN[arch](seed, sizes, ctx)
            seconds = time.perf_counter() - t0
            path = args.out / f"{arch}-seed{seed}"
            # The module's own tensor names: transformers 5 would otherwise write ViT under its
            # 4.x names (the key conversion it applies on load), which mergecli reads as they are.
            model.save_pretrained(path, safe_serialization=True, save_original_format=False)
            if tokenizer is not None:
                lm_demo.save_tokenizer(tokenizer, path)
            meta = {"arch": arch, "seed": seed, "sizes": asdict(sizes), "loss": loss,
                    **metrics, "seconds": seconds, "torch_threads": threads}  # fmt: skip
            (path / "training.json").write_text(json.dumps(meta, indent=2) + "\n")
            shown = ", ".join(f"{k} {v:.4g}" for k, v in metrics.items())
            params = sum(p.numel() for p in model.parameters())
            print(f"{arch}-seed{seed}: {params:,} parameters, loss {loss:.3f}, {shown}, "
                  f"{seconds:.0f} s")  # fmt: skip
            results[f"seed{seed}"] = {**metrics, "seconds": seconds}
        # Written last: it stands for the pair (the Makefile's target).
        (args.out / f"{arch}.json").write_text(json.dumps(results, indent=2) + "\n")
    print(f"total {time.perf_counter() - start:.0f} s on {threads} threads")
    return 0


if __name__ == "__main__":
    sys.exit(main())
