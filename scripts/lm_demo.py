"""Train the language-model demo's checkpoints: a byte-level BPE tokenizer on both domains'
training text, a small Llama pre-trained on both domains, then one fine-tune per domain.

    python scripts/lm_demo.py [--out runs/lm] [--data data/text] [--tiny]

Writes Hugging Face model directories (config, generation config, model.safetensors, tokenizer)
``OUT/base``, ``OUT/ft-english`` and ``OUT/ft-code``, then prints each checkpoint's perplexity on
each domain's eval text (packed blocks of ``seq_len`` tokens, every next token scored) and
writes the same table to ``OUT/perplexity.json``. Deterministic for a given machine and thread
count (seeded; the text is tokenized as whole files, without special tokens, as the ``text``
data source does). ``--tiny`` shrinks everything for the tests (seconds).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
DOMAINS = ("english", "code")
EOS = "<|endoftext|>"


@dataclass(frozen=True)
class Sizes:
    vocab: int = 2048
    hidden: int = 128
    intermediate: int = 352
    layers: int = 4
    heads: int = 4
    kv_heads: int = 2
    positions: int = 256
    seq_len: int = 128
    # Small batches, many steps: in a few CPU minutes that learns more than larger batches.
    batch: int = 8
    pretrain_steps: int = 1000
    pretrain_lr: float = 5e-3
    finetune_steps: int = 200
    finetune_lr: float = 1e-3
    max_chars: int = 0  # 0: all of each file


TINY = Sizes(
    vocab=300,
    hidden=32,
    intermediate=64,
    layers=2,
    heads=2,
    kv_heads=1,
    positions=64,
    seq_len=32,
    batch=4,
    pretrain_steps=4,
    finetune_steps=2,
    max_chars=20_000,
)


def read(path: Path, sizes: Sizes) -> str:
    text = path.read_text(encoding="utf-8")
    return text[: sizes.max_chars] if sizes.max_chars else text


def train_tokenizer(texts: list[str], sizes: Sizes):
    """Byte-level BPE (GPT-2's pre-tokenizer and byte alphabet), as a transformers tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=sizes.vocab,
        min_frequency=2,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    # One special token serves as bos, eos and pad (GPT-2's convention); none is added on encode.
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=EOS,
        eos_token=EOS,
        pad_token=EOS,
        unk_token=None,
        model_max_length=sizes.positions,
    )


def token_ids(tokenizer, path: Path, sizes: Sizes) -> torch.Tensor:
    """The file's ids as mergecli's `text` source reads it (each blank-line-separated document,
    then EOS), so that the models are trained on the token stream the merges are scored on."""
    from mergecli.data.text import documents

    ids: list[int] = []
    chars = 0
    for document in documents(path, "text", str(path)):
        ids.extend(tokenizer(document, add_special_tokens=False)["input_ids"])
        ids.append(tokenizer.eos_token_id)
        chars += len(document)
        if sizes.max_chars and chars >= sizes.max_chars:
            break
    return torch.tensor(ids, dtype=torch.long)


def new_model(tokenizer, sizes: Sizes):
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    eos = tokenizer.eos_token_id
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=sizes.hidden,
        intermediate_size=sizes.intermediate,
        num_hidden_layers=sizes.layers,
        num_attention_heads=sizes.heads,
        num_key_value_heads=sizes.kv_heads,
        max_position_embeddings=sizes.positions,
        rms_norm_eps=1e-5,
        bos_token_id=eos,
        eos_token_id=eos,
        pad_token_id=eos,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(
        bos_token_id=eos, eos_token_id=eos, pad_token_id=eos, max_new_tokens=64
    )
    return model


def random_blocks(streams: list[torch.Tensor], batch: int, seq_len: int, gen: torch.Generator):
    """``batch`` windows of ``seq_len`` tokens at random offsets, an equal share per stream."""
    rows = []
    for i in range(batch):
        ids = streams[i % len(streams)]
        start = int(torch.randint(0, len(ids) - seq_len + 1, (1,), generator=gen))
        rows.append(ids[start : start + seq_len])
    return torch.stack(rows)


def optimise(
    model, loss_of: Callable[[torch.Generator], torch.Tensor], steps: int, lr: float, seed: int
) -> float:
    """AdamW with linear warm-up (10%) and cosine decay, gradients clipped to norm 1;
    ``loss_of(gen)`` draws a batch with the seeded ``gen`` and returns the model's loss on it.
    Returns the last step's loss."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.95))
    warmup = max(1, steps // 10)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    model.train()
    loss = torch.tensor(float("nan"))
    for _ in range(steps):
        loss = loss_of(gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
    model.eval()
    return loss.item()


def train(model, streams, steps: int, lr: float, sizes: Sizes, seed: int) -> float:
    """Next-token training on random windows of the token streams (see `optimise`)."""

    def loss_of(gen: torch.Generator) -> torch.Tensor:
        x = random_blocks(streams, sizes.batch, sizes.seq_len, gen)
        return model(input_ids=x, labels=x).loss

    return optimise(model, loss_of, steps, lr, seed)


@torch.no_grad()
def perplexity(model, ids: torch.Tensor, seq_len: int, batch: int = 32) -> float:
    """exp(mean next-token cross-entropy) over consecutive blocks (the partial last one dropped)."""
    n = len(ids) // seq_len
    blocks = ids[: n * seq_len].view(n, seq_len)
    total, count = 0.0, 0
    for i in range(0, n, batch):
        x = blocks[i : i + batch]
        logits = model(input_ids=x).logits[:, :-1]
        total += float(
            torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction="sum"
            )
        )
        count += x[:, 1:].numel()
    return math.exp(total / count)


def save_tokenizer(tokenizer, path: Path) -> None:
    tokenizer.save_pretrained(path)
    # transformers 5 names its own class here; the generic name loads in 4.x and 5.x alike.
    config_path = path / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_path.write_text(json.dumps(config, indent=2) + "\n")


def save(model, tokenizer, path: Path, meta: dict) -> None:
    # safetensors is save_pretrained's format (the only one in transformers 5).
    model.save_pretrained(path)
    save_tokenizer(tokenizer, path)
    (path / "training.json").write_text(json.dumps(meta, indent=2) + "\n")


def missing_hf_extra() -> str | None:
    """The error to print when transformers or tokenizers is missing; else quiets transformers."""
    try:
        import tokenizers  # noqa: F401
        import transformers
    except ImportError as err:
        return f"error: {err.name} is not installed (pip install 'mergecli[hf]')"
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "lm")
    parser.add_argument("--data", type=Path, default=ROOT / "data" / "text")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tiny", action="store_true", help="tiny sizes and steps (tests)")
    args = parser.parse_args(argv)
    sizes = TINY if args.tiny else Sizes()
    if error := missing_hf_extra():
        print(error)
        return 1

    start = time.perf_counter()
    torch.manual_seed(args.seed)
    train_text = {d: read(args.data / d / "train.txt", sizes) for d in DOMAINS}
    tokenizer = train_tokenizer(list(train_text.values()), sizes)
    train_ids = {d: token_ids(tokenizer, args.data / d / "train.txt", sizes) for d in DOMAINS}
    # The whole eval text, at every size: the merges' evaluation reads all of it.
    whole = replace(sizes, max_chars=0)
    eval_ids = {d: token_ids(tokenizer, args.data / d / "eval.txt", whole) for d in DOMAINS}
    for d in DOMAINS:
        print(f"{d}: {len(train_ids[d]):,} train tokens, {len(eval_ids[d]):,} eval tokens")
    print(f"tokenizer: {len(tokenizer)} tokens ({time.perf_counter() - start:.1f} s)")

    common = {"sizes": asdict(sizes), "seed": args.seed, "torch_threads": torch.get_num_threads()}
    models = {}
    t0 = time.perf_counter()
    base = new_model(tokenizer, sizes)
    print(f"model: {sum(p.numel() for p in base.parameters()):,} parameters")
    streams = [train_ids[d] for d in DOMAINS]
    loss = train(base, streams, sizes.pretrain_steps, sizes.pretrain_lr, sizes, args.seed)
    seconds = time.perf_counter() - t0
    on = "+".join(DOMAINS)
    print(f"base: {sizes.pretrain_steps} steps on {on}, loss {loss:.3f}, {seconds:.0f} s")
    save(
        base,
        tokenizer,
        args.out / "base",
        {**common, "trained_on": list(DOMAINS), "seconds": seconds},
    )
    models["base"] = base

    for i, domain in enumerate(DOMAINS):
        t0 = time.perf_counter()
        ft = new_model(tokenizer, sizes)
        ft.load_state_dict(base.state_dict())
        seed = args.seed + 1 + i
        loss = train(ft, [train_ids[domain]], sizes.finetune_steps, sizes.finetune_lr, sizes, seed)
        seconds = time.perf_counter() - t0
        print(f"ft-{domain}: {sizes.finetune_steps} steps, loss {loss:.3f}, {seconds:.0f} s")
        meta = {**common, "init": "base", "trained_on": [domain], "seconds": seconds}
        save(ft, tokenizer, args.out / f"ft-{domain}", meta)
        models[f"ft-{domain}"] = ft

    table = {
        name: {d: perplexity(model, eval_ids[d], sizes.seq_len) for d in DOMAINS}
        for name, model in models.items()
    }
    (args.out / "perplexity.json").write_text(json.dumps(table, indent=2) + "\n")
    print(f"\nperplexity on eval (seq_len {sizes.seq_len})")
    print(f"{'checkpoint':<12}" + "".join(f"{d:>10}" for d in DOMAINS))
    for name, row in table.items():
        print(f"{name:<12}" + "".join(f"{row[d]:>10.2f}" for d in DOMAINS))
    print(f"total {time.perf_counter() - start:.0f} s on {torch.get_num_threads()} threads")
    return 0


if __name__ == "__main__":
    sys.exit(main())
