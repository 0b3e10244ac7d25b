"""In-run forgetting probes: how much of what the base model could do is lost by fine-tuning.

A probe is measured on the pre-trained model (before) and on the fine-tuned model (after), on the same data.
`forgetting` is the loss of ability, positive when the model got worse on the probe:
before - after for scores where higher is better (Spearman, accuracy), after - before for losses.
The probes themselves (`sts`, `mlm`, `ppl`, `wiki`, settings in `conf/forgetting/<probe>.yaml`) are described in
analysis/forgetting.py, which also runs them offline on saved runs and holds the two-training `sequential`
experiment. A new probe is a `Probe` subclass here, listed in PROBE_CLASSES, plus its yaml.

The loss probes (`mlm`, `ppl`, `wiki`) are built from the same parts: a held-out text (STS-B dev sentences, or
Wikipedia articles: `wiki_texts`), tokenised into right-padded batches (`text_batches`), and one scorer per model
kind, each returning a summed cross-entropy and the number of tokens it sums, so every loss is pooled over tokens:
`causal_lm_ce` (the run's causal LM as it runs) and `masked_lm_ce` (the checkpoint's pre-trained MLM head on the
run's encoder). `wiki` is one probe for every model kind: it picks the scorer by the model's kind.

Probes run under `torch.random.fork_rng`, so turning forgetting on does not change the run's training.
"""

from __future__ import annotations

import contextlib
import itertools
import os
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from omegaconf import DictConfig
from scipy.stats import spearmanr
from torch import nn

from bench import BenchError
from bench.config import compose_config
from bench.data.encode import subset
from bench.data.files import read_jsonl
from bench.data.tasks import get_task, load_task
from bench.hashing import file_sha256
from bench.model import is_causal_lm, resolve_source
from bench.model.precision import autocast

PROBES = ("sts", "mlm", "ppl", "wiki", "sequential")


def backbone(model: nn.Module) -> nn.Module:
    """The encoder/decoder stack of a (possibly peft-wrapped) transformers model, with its changes."""
    from peft import PeftModel

    if isinstance(model, PeftModel):
        model = model.get_base_model()
    return getattr(model, "base_model", model)


@contextlib.contextmanager
def _eval_mode(model: nn.Module):
    was_training = model.training
    model.eval()
    try:
        with torch.random.fork_rng(devices=[]), torch.inference_mode():
            yield
    finally:
        model.train(was_training)


def _probe_sentences(max_rows: int | None) -> tuple[list[str], list[str], np.ndarray]:
    _, dev, _ = load_task(get_task("stsb"))
    dev = subset(dev, max_rows)
    return dev["text_a"].tolist(), dev["text_b"].tolist(), dev["label"].to_numpy(dtype=float)


class Probe:
    name: ClassVar[str]
    metric: ClassVar[str]
    higher_is_better: ClassVar[bool]

    def __init__(self, cfg: Any, model_cfg: Any, tokenizer, task: str | None = None):
        self.cfg, self.model_cfg, self.tokenizer, self.task = cfg, model_cfg, tokenizer, task

    def measure(self, model: nn.Module, device: torch.device, amp_dtype: torch.dtype | None = None) -> float:
        raise NotImplementedError

    def result(self, before: float, after: float) -> dict:
        lost = before - after if self.higher_is_better else after - before
        out = {
            "probe": self.name,
            "metric": self.metric,
            "higher_is_better": self.higher_is_better,
            "before": before,
            "after": after,
            "forgetting": lost,
        }
        if self.name == "sts" and self.task == "stsb":
            out["note"] = "the run's task is STS-B: this probe measures learning, not forgetting"
        return out


class StsProbe(Probe):
    name = "sts"
    metric = "stsb_spearman_zero_shot"
    higher_is_better = True

    def __init__(self, cfg: Any, model_cfg: Any, tokenizer, task: str | None = None):
        super().__init__(cfg, model_cfg, tokenizer, task)
        self.text_a, self.text_b, self.gold = _probe_sentences(cfg.get("max_pairs"))

    def embed(
        self, encoder: nn.Module, texts: list[str], device: torch.device, amp_dtype: torch.dtype | None
    ) -> torch.Tensor:
        order = np.argsort([len(t) for t in texts])  # similar lengths per batch: less padding
        out = torch.empty(len(texts), encoder.config.hidden_size)
        bs = int(self.cfg.batch_size)
        for i in range(0, len(texts), bs):
            idx = order[i : i + bs]
            enc = self.tokenizer(
                [texts[j] for j in idx],
                padding=True,
                truncation=True,
                max_length=int(self.cfg.max_seq_len),
                return_tensors="pt",
            ).to(device)
            with autocast(device, amp_dtype):
                hidden = encoder(
                    input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]
                ).last_hidden_state
            mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            out[torch.as_tensor(idx)] = ((hidden * mask).sum(1) / mask.sum(1).clamp(min=1)).float().cpu()
        return out

    def measure(self, model: nn.Module, device: torch.device, amp_dtype: torch.dtype | None = None) -> float:
        encoder = backbone(model)
        with _eval_mode(model):
            a = self.embed(encoder, self.text_a, device, amp_dtype)
            b = self.embed(encoder, self.text_b, device, amp_dtype)
        cos = torch.nn.functional.cosine_similarity(a, b).numpy()
        return float(spearmanr(cos, self.gold).statistic)


def text_batches(tokenizer, texts: list[str], batch_size: int, max_len: int) -> list[dict[str, torch.Tensor]]:
    """`texts` tokenised each on its own as the tokenizer does (its special tokens included: a BOS when it adds one),
    each cut to `max_len` tokens, in batches of `batch_size` in the texts' order, padded on the right (attention_mask
    0). The tokenizer's own padding settings are neither used nor changed: the run's data share it."""
    ids = tokenizer(list(texts), truncation=True, max_length=max_len)["input_ids"]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    batches = []
    for i in range(0, len(ids), batch_size):
        rows = ids[i : i + batch_size]
        width = max(map(len, rows))
        batches.append({"input_ids": torch.tensor([r + [pad] * (width - len(r)) for r in rows]),
                        "attention_mask": torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])})
    return batches


def causal_lm_ce(model: nn.Module, batches: list[dict[str, torch.Tensor]], device: torch.device,
                 amp_dtype: torch.dtype | None = None) -> tuple[float, int]:
    """(summed next-token cross-entropy in nats, the number of tokens summed) of a causal LM as it runs over
    `batches` (`text_batches`): every real token after a row's first is a target, padding is not. A prompt-tuned
    model runs with its virtual tokens in front; the logits of a row's own tokens are its last ones, and only they
    are scored, so the targets are the same tokens with and without a prompt (peft's causal-LM loss would also score
    the row's first token, predicted from the last virtual token). peft's method comparison scores its forgetting
    text the same way."""
    total, n = 0.0, 0
    with _eval_mode(model):
        for enc in batches:
            ids, mask = enc["input_ids"].to(device), enc["attention_mask"].to(device)
            with autocast(device, amp_dtype):
                logits = model(input_ids=ids, attention_mask=mask).logits
            logits = logits[:, -ids.shape[1] : -1].float()  # position t predicts token t + 1
            targets = ids[:, 1:].masked_fill(~mask[:, 1:].bool(), -100)
            total += float(torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum"))
            n += int(mask[:, 1:].sum())
    return total, n


def pretrained_mlm_head(probe: str, model_cfg: Any, instead: str) -> nn.Module:
    """The checkpoint's own pre-trained masked-LM model, whose head the probe puts on the run's (fine-tuned)
    encoder (`masked_lm_ce`). BenchError, ending in `instead` (what to use), when the checkpoint has no MLM head."""
    import transformers

    if model_cfg.get("random_init"):
        raise BenchError(f"forgetting={probe}: model '{model_cfg.name}' is a random-init test model with no "
                         f"pre-trained masked-LM head{instead}")
    path, _ = resolve_source(model_cfg)
    try:
        lm, info = transformers.AutoModelForMaskedLM.from_pretrained(path, output_loading_info=True)
    except (OSError, ValueError) as exc:
        raise BenchError(f"forgetting={probe}: model '{model_cfg.name}' cannot load as AutoModelForMaskedLM: "
                         f"{str(exc).splitlines()[0][:160]}{instead}") from exc
    missing_head = [k for k in info["missing_keys"] if not k.startswith(lm.base_model_prefix + ".")]
    if missing_head:
        raise BenchError(f"forgetting={probe}: model '{model_cfg.name}' has no pre-trained masked-LM head "
                         f"(missing {missing_head[0]}){instead}")
    return lm.eval()


@contextlib.contextmanager
def _with_backbone(lm: nn.Module, model: nn.Module, device: torch.device):
    """`lm` (a pre-trained head model) with the run's backbone in place of its own, put back afterwards."""
    prefix = lm.base_model_prefix
    own = getattr(lm, prefix)
    setattr(lm, prefix, backbone(model))
    lm.to(device)
    try:
        yield lm
    finally:
        setattr(lm, prefix, own)


def masked_lm_ce(lm: nn.Module, model: nn.Module, tokenizer, batches: list[dict[str, torch.Tensor]],
                 mask_fraction: float, device: torch.device, amp_dtype: torch.dtype | None = None
                 ) -> tuple[float, int]:
    """(summed masked-LM cross-entropy in nats, the number of masked tokens) of `lm`'s pre-trained head on `model`'s
    encoder over `batches` (`text_batches`): a share `mask_fraction` of the real, non-special tokens replaced by the
    mask token, at positions drawn from a generator seeded 0, so every call masks the same tokens."""
    gen = torch.Generator().manual_seed(0)
    total, n = 0.0, 0
    with _eval_mode(model), _with_backbone(lm, model, device) as lm:
        for enc in batches:
            ids = enc["input_ids"].clone()
            special = torch.tensor(
                [tokenizer.get_special_tokens_mask(row, already_has_special_tokens=True) for row in ids.tolist()],
                dtype=torch.bool,
            )
            pick = (torch.rand(ids.shape, generator=gen) < mask_fraction) & ~special & enc["attention_mask"].bool()
            labels = torch.where(pick, ids, torch.full_like(ids, -100))
            ids[pick] = tokenizer.mask_token_id
            with autocast(device, amp_dtype):
                out = lm(input_ids=ids.to(device), attention_mask=enc["attention_mask"].to(device),
                         labels=labels.to(device))
            k = int(pick.sum())
            total += float(out.loss) * k
            n += k
    return total, n


class _TextLossProbe(Probe):
    """A loss on held-out text, pooled over its tokens (token-weighted); the record also gets the text's source and
    the number of tokens pooled (`text_source`, `tokens`)."""

    higher_is_better = False
    source: str
    tokens: int | None = None

    def result(self, before: float, after: float) -> dict:
        return {**super().result(before, after), "text_source": self.source, "tokens": self.tokens}


def _stsb_sentences(cfg: Any) -> tuple[list[str], str]:
    sentences, _, _ = _probe_sentences(cfg.get("max_sentences"))
    return sentences, f"STS-B dev: sentence 1 of {len(sentences)} pairs (a fixed subset, seed 0)"


class MlmProbe(_TextLossProbe):
    """Masked-LM loss (nats per masked token) of the checkpoint's pre-trained MLM head on the run's encoder, on
    held-out general English (STS-B dev sentence 1s)."""

    name = "mlm"
    metric = "mlm_loss_nats_per_token"

    def __init__(self, cfg: Any, model_cfg: Any, tokenizer, task: str | None = None):
        super().__init__(cfg, model_cfg, tokenizer, task)
        self.lm = pretrained_mlm_head(self.name, model_cfg, "; use forgetting=sts")
        sentences, self.source = _stsb_sentences(cfg)
        self.batches = text_batches(tokenizer, sentences, int(cfg.batch_size), int(cfg.max_seq_len))

    def measure(self, model: nn.Module, device: torch.device, amp_dtype: torch.dtype | None = None) -> float:
        total, self.tokens = masked_lm_ce(self.lm, model, self.tokenizer, self.batches,
                                          float(self.cfg.mask_fraction), device, amp_dtype)
        return total / max(self.tokens, 1)


class PplProbe(_TextLossProbe):
    """Perplexity of a causal LM on held-out general English (STS-B dev sentence 1s, each scored on its own), the
    fine-tuned model as it runs (a prompt-tuned model with its virtual tokens in front): exp of the mean token
    cross-entropy (`causal_lm_ce`)."""

    name = "ppl"
    metric = "perplexity"

    def __init__(self, cfg: Any, model_cfg: Any, tokenizer, task: str | None = None):
        super().__init__(cfg, model_cfg, tokenizer, task)
        if not is_causal_lm(model_cfg):
            raise BenchError(f"forgetting=ppl: model '{model_cfg.name}' is an encoder, not a causal LM; "
                             f"use forgetting=sts or mlm")
        sentences, self.source = _stsb_sentences(cfg)
        self.batches = text_batches(tokenizer, sentences, int(cfg.batch_size), int(cfg.max_seq_len))

    def measure(self, model: nn.Module, device: torch.device, amp_dtype: torch.dtype | None = None) -> float:
        total, self.tokens = causal_lm_ce(model, self.batches, device, amp_dtype)
        return float(np.exp(total / max(self.tokens, 1)))


def wiki_texts(cfg: Any) -> tuple[list[str], str]:
    """(the first `cfg.documents` Wikipedia articles' text, where they came from): `$WIKI_DIR/<cfg.file>` (JSON
    lines, field `text`) when WIKI_DIR is set (`cfg.source=auto`) or `cfg.source=file`; else the Hub dataset
    `cfg.dataset` (split `cfg.split`, streaming, its first rows' `text`), as peft's method comparison reads it.
    BenchError, one line, when neither works."""
    n, source, folder = int(cfg.documents), str(cfg.source), os.environ.get("WIKI_DIR")
    if source not in ("auto", "file", "hub"):
        raise BenchError(f"forgetting.source={source!r}: choose auto (the file when WIKI_DIR is set, else the Hub), "
                         "file or hub")
    if n < 1:
        raise BenchError(f"forgetting.documents={n}: at least 1")
    if source == "file" or (source == "auto" and folder):
        if not folder:
            raise BenchError("forgetting=wiki: forgetting.source=file needs WIKI_DIR, the folder of "
                             f"{cfg.file} (offline: WIKI_DIR=../shared/data/wiki)")
        path = Path(folder).expanduser() / str(cfg.file)
        if not path.is_file():
            raise BenchError(f"forgetting=wiki: WIKI_DIR={folder} has no {cfg.file}; point WIKI_DIR at the folder that "
                             f"holds it (offline: ../shared/data/wiki), or unset it to read {cfg.dataset} from the Hub")
        rows = read_jsonl(path, required=("text",))
        if len(rows) < n:
            raise BenchError(f"forgetting=wiki: {path} holds {len(rows)} documents, fewer than "
                             f"forgetting.documents={n}")
        return (rows["text"].head(n).tolist(),
                f"file {path.name} (sha256 {file_sha256(path)}): its first {n} of {len(rows)} documents")
    subset = cfg.get("subset")
    where = f"{cfg.dataset}{f'/{subset}' if subset else ''} split {cfg.split}"
    try:
        import datasets

        rows = list(itertools.islice(datasets.load_dataset(str(cfg.dataset), subset, split=str(cfg.split),
                                                           streaming=True), n))
    except Exception as exc:  # noqa: BLE001 - any failure here means "no text", reported in one line
        why = "WIKI_DIR is not set and " if source == "auto" else ""
        raise BenchError(f"forgetting=wiki: no Wikipedia text: {why}the Hub dataset {cfg.dataset} cannot be read "
                         f"({type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''}); go online, "
                         "or set WIKI_DIR to the offline sample (WIKI_DIR=../shared/data/wiki)") from exc
    texts = []
    for i, row in enumerate(rows, start=1):
        text = row.get("text") if isinstance(row, dict) else None
        if not isinstance(text, str) or not text.strip():
            raise BenchError(f"forgetting=wiki: {where}: row {i} has no text (fields: "
                             f"{', '.join(row) if isinstance(row, dict) else type(row).__name__})")
        texts.append(text)
    if len(texts) < n:
        raise BenchError(f"forgetting=wiki: {where} holds {len(texts)} rows, fewer than forgetting.documents={n}")
    return texts, f"hub {where} (streaming): its first {n} rows"


class WikiProbe(_TextLossProbe):
    """Forgetting as peft's method comparison measures it: the mean cross-entropy per token (nats) of held-out
    Wikipedia text (`wiki_texts`), each document one window cut at `max_tokens`, pooled over every scored token of
    every document. A causal LM is scored on next-token prediction as it runs (`causal_lm_ce`, as `ppl` scores it);
    an encoder whose checkpoint has an MLM head on masked tokens (`masked_lm_ce`, as `mlm` scores it); any other
    model is refused here, before training."""

    name = "wiki"

    def __init__(self, cfg: Any, model_cfg: Any, tokenizer, task: str | None = None):
        super().__init__(cfg, model_cfg, tokenizer, task)
        max_len = int(cfg.max_tokens)
        if is_causal_lm(model_cfg):
            self.lm, self.metric = None, "next_token_ce_nats_per_token"
        else:
            self.lm = pretrained_mlm_head(
                self.name, model_cfg, " and is not a causal LM; use forgetting=sts (zero-shot STS-B of its embeddings)")
            self.metric = "mlm_loss_nats_per_token"
            max_len = min(max_len, int(tokenizer.model_max_length))  # an encoder's positions end (BERT: 512)
        texts, source = wiki_texts(cfg)
        self.source = f"{source}, each cut to {max_len} tokens"
        self.batches = text_batches(tokenizer, texts, int(cfg.batch_size), max_len)

    def measure(self, model: nn.Module, device: torch.device, amp_dtype: torch.dtype | None = None) -> float:
        if self.lm is None:
            total, self.tokens = causal_lm_ce(model, self.batches, device, amp_dtype)
        else:
            total, self.tokens = masked_lm_ce(self.lm, model, self.tokenizer, self.batches,
                                              float(self.cfg.mask_fraction), device, amp_dtype)
        return total / max(self.tokens, 1)


PROBE_CLASSES: dict[str, type[Probe]] = {"sts": StsProbe, "mlm": MlmProbe, "ppl": PplProbe, "wiki": WikiProbe}


def make_probe(cfg: Any, model_cfg: Any, tokenizer, task: str | None = None) -> Probe:
    """The probe that `conf/forgetting/<name>.yaml` asks for (BenchError when unknown or unusable)."""
    name = str(cfg.probe)
    if name == "sequential":
        raise BenchError(
            "forgetting=sequential needs two trainings and is not an in-run probe; run "
            "`python -m bench.tools.sequential <run dir of task A> --task-b <task>`"
        )
    if name not in PROBE_CLASSES:
        raise BenchError(f"unknown forgetting probe '{name}'; choose one of: {', '.join(PROBES)}")
    with torch.random.fork_rng(devices=[]):  # loading a head model must not move the run's random state
        return PROBE_CLASSES[name](cfg, model_cfg, tokenizer, task)


def probe_config(name: str, **overrides: Any) -> DictConfig:
    """`conf/forgetting/<name>.yaml` composed through Hydra, with overrides (e.g. max_pairs=64)."""
    return compose_config([f"forgetting={name}", *(f"forgetting.{k}={v}" for k, v in overrides.items())]).forgetting
