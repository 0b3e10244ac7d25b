"""FLOPs of training and what share of the device's peak a run used: model FLOPs utilisation (MFU) and hardware
FLOPs utilisation (HFU).

The count (Chowdhery et al. 2022, "PaLM: Scaling Language Modeling with Pathways", appendix B): 2 FLOPs per
multiply-accumulate of every matrix multiplication, the attention's own two (scores Q·Kᵀ and the weighted sum of
the values) included; elementwise work (norms, softmax, activations, the loss) and embedding lookups count 0. A
matmul's backward costs twice its forward (one product for the input's gradient, one for the weight's), so full
training of a model with N matmul parameters over sequences of length T is PaLM's

    6N + 12·L·H·Q·T   FLOPs per token   (L layers, H attention heads of size Q)

where 2N + 4·L·H·Q·T is the forward. N counts each weight where it multiplies: the LM head of a causal LM once,
whether or not it is tied to the input embeddings (the lookup of the tied table is free); a classifier's head
(BERT's pooler and classifier, RoBERTa's dense and out_proj) reads one position per sequence, so it counts per
sequence, not per token.

Parameter-efficient fine-tuning computes less: the frozen weights need no weight gradient, but the gradient still
flows back through them to the trainable weights below (the activation gradient, the size of the forward). So

    training = forward + activation-gradient backward (≈ forward) + weight gradients of the trainable weights only

with the task head trainable for every method and each trainable adapter parameter costing 6 FLOPs per token
(its forward, its input's gradient and its own gradient: exact for LoRA's A and B and bottleneck adapters, whose
parameters are all matmul weights applied once per token). Full fine-tuning (`trains_all_weights`) is PaLM's 3x the
forward. The activation gradient is counted through every layer, which is what autograd computes above the first
trainable parameter. Below it nothing needs a gradient: with frozen embeddings, layer 0's input projections (Q, K,
V) compute no input gradient, its attention no key gradient where K has no adapter, and an adapter that reads the
embedding output (LoRA's A in layer 0) no input gradient either. For such methods the formula is an upper bound by
at most these layer-0 terms: 10% on the 2-layer test BERT with LoRA, about 2% on 6-layer MiniLM, 0.3% on the
2-layer test Llama whose LM head dominates (tests/test_flops.py holds the formula to FlopCounterMode: equal for
the forward and full fine-tuning, and for LoRA over by exactly these terms).

Which parameters train comes from the record's counts (`trainable_params_excl_head` and the method's
`trains_all_weights`), not from walking the built model's modules: the counts are in every record, so a reader can
redo the arithmetic from the record alone, and a module walk would not be more right, since many methods' compute is
not where their parameters are (VeRA's frozen random matrices, IA3's and BitFit's vectors, prompt tuning's virtual
tokens that go through the whole model). For those methods the adapter term is an approximation, small beside the
base model's.

Model FLOPs (MFU) are what the maths needs; hardware FLOPs (HFU) add what the run computes again: under gradient
checkpointing each checkpointed layer's forward runs a second time in the backward. A run without it has HFU = MFU.
Padding tokens are in neither: the attention term uses each sequence's own length (`attention_seq_len`, the token-
weighted mean length), as throughput counts non-padding tokens only.

The peak: a datasheet figure (dense, no sparsity) for known GPUs in the run's compute dtype; on a CPU or an unknown
GPU, a measured matmul probe (`measured_peak`), labelled `measured` in the record.
"""
from __future__ import annotations

import functools
import re
import time
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn
from transformers.modeling_layers import GradientCheckpointingLayer

from bench.model.device import device_name as bench_device_name
from bench.model.device import sync
from bench.model.distributed import unwrap
from bench.model.precision import Dtypes, dtype_name

# transformers model types with BERT's layout (query/key/value/output, a 2-matrix MLP, a pooled classifier head)
ENCODER_TYPES = ("bert", "roberta", "xlm-roberta", "camembert", "electra")
# Llama-like decoders: q/k/v/o projections with grouped-query attention, a gated MLP (gate, up, down), an LM head
DECODER_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "olmo", "olmo2", "granite")

PeakSource = Literal["datasheet", "measured"]


@dataclass(frozen=True)
class Architecture:
    """What the FLOPs depend on, read from a transformers config."""

    model_type: str
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    gated_mlp: bool
    vocab: int
    lm_head: bool  # a causal LM's head over the vocabulary at every position; else a classifier head per sequence
    num_labels: int

    @classmethod
    def from_config(cls, config: Any, causal_lm: bool) -> Architecture:
        """ValueError for a model type without a formula here."""
        kind = str(config.model_type)
        if kind not in ENCODER_TYPES + DECODER_TYPES:
            raise ValueError(f"no FLOPs formula for model type '{kind}' (known: {', '.join(ENCODER_TYPES)}; "
                             f"{', '.join(DECODER_TYPES)})")
        heads = int(config.num_attention_heads)
        head_dim = getattr(config, "head_dim", None) or int(config.hidden_size) // heads
        return cls(model_type=kind, layers=int(config.num_hidden_layers), hidden=int(config.hidden_size),
                   heads=heads, kv_heads=int(getattr(config, "num_key_value_heads", None) or heads),
                   head_dim=int(head_dim), intermediate=int(config.intermediate_size),
                   gated_mlp=kind in DECODER_TYPES, vocab=int(config.vocab_size), lm_head=causal_lm,
                   num_labels=int(getattr(config, "num_labels", 2)))

    @property
    def layer_params(self) -> int:
        """Matmul weights of one layer (biases add, they do not multiply): Q, K, V (K and V over the key-value
        heads), the attention output, and the MLP (gate, up, down; or BERT's two)."""
        d, attn = self.hidden, self.heads * self.head_dim
        kv = self.kv_heads * self.head_dim
        return d * attn + 2 * d * kv + attn * d + (3 if self.gated_mlp else 2) * d * self.intermediate

    @property
    def token_params(self) -> int:
        """Matmul weights applied at every position: the layers, and a causal LM's head (tied or not)."""
        return self.layers * self.layer_params + (self.vocab * self.hidden if self.lm_head else 0)

    @property
    def sequence_params(self) -> int:
        """Matmul weights applied once per sequence: a classifier's head on the first position (BERT's pooler dense
        and classifier; RoBERTa's dense and out_proj: the same shapes)."""
        return 0 if self.lm_head else self.hidden * self.hidden + self.hidden * self.num_labels

    @property
    def attention_macs(self) -> int:
        """Multiply-accumulates per (token, context token) pair, summed over layers: Q·Kᵀ and the weights times V
        over every query head (grouped-query attention shares K and V, not the products)."""
        return self.layers * 2 * self.heads * self.head_dim


@dataclass(frozen=True)
class Work:
    """What a batch (or the timed window) held: non-padding tokens, the sum over sequences of their squared
    lengths (the (query, key) pairs attention multiplies), and sequences."""

    tokens: float
    token_pairs: float
    sequences: float

    @classmethod
    def uniform(cls, seq_len: int, sequences: int = 1) -> Work:
        return cls(seq_len * sequences, seq_len * seq_len * sequences, sequences)


@dataclass(frozen=True)
class Trainable:
    """What trains: every weight (full fine-tuning), or the task head plus `adapter_params` more parameters."""

    all_weights: bool
    adapter_params: int = 0


def forward_flops(arch: Architecture, work: Work, adapter_params: int = 0) -> float:
    """Forward FLOPs: 2 per multiply-accumulate of every matmul (PaLM, appendix B), adapters' included."""
    weights = (arch.token_params + adapter_params) * work.tokens + arch.sequence_params * work.sequences
    return 2.0 * (weights + arch.attention_macs * work.token_pairs)


def training_flops(arch: Architecture, work: Work, trainable: Trainable) -> float:
    """Model FLOPs of one training pass (forward + backward) over `work`. Full fine-tuning: 3x the forward
    (6N + 12·L·H·Q·T per token). Otherwise the forward, the activation gradient through every matmul (its forward
    again; the attention's two products take two each, as both operands carry gradients) and the weight gradients
    of the trainable ones: the task head and the adapters."""
    fwd = forward_flops(arch, work)
    if trainable.all_weights:
        return 3.0 * fwd
    weights_fwd = 2.0 * arch.token_params * work.tokens
    head_fwd = 2.0 * arch.sequence_params * work.sequences
    attention_fwd = 2.0 * arch.attention_macs * work.token_pairs
    adapters = 6.0 * trainable.adapter_params * work.tokens
    return 2 * weights_fwd + 3 * head_fwd + 3 * attention_fwd + adapters


def recompute_flops(arch: Architecture, work: Work, adapter_params: int = 0, layers: int | None = None) -> float:
    """What gradient checkpointing computes again: the forward of each checkpointed layer (`layers`; None: all),
    its matmuls, its attention and the adapters inside it; not the embeddings' or the head's. An upper bound under
    PyTorch's non-reentrant checkpointing (transformers' default), which stops recomputing a layer once the tensors
    its backward needs are back, so a layer's last matmul (a Llama layer's down projection, whose output no backward
    reads) does not run again."""
    share = 1.0 if layers is None else layers / arch.layers
    per_layer = arch.layer_params * work.tokens + arch.attention_macs / arch.layers * work.token_pairs
    return 2.0 * share * (arch.layers * per_layer + adapter_params * work.tokens)


def flops_per_token(arch: Architecture, seq_len: int, trainable: Trainable | None = None) -> float:
    """FLOPs per token of sequences of `seq_len` tokens: the forward (`trainable` None) or a training step."""
    work = Work.uniform(seq_len)
    total = forward_flops(arch, work) if trainable is None else training_flops(arch, work, trainable)
    return total / seq_len


def checkpointed_layers(model: nn.Module) -> int:
    """How many layers recompute their forward in the backward (gradient checkpointing), read from the model as
    built (a peft wrapper's too): transformers flags each checkpointed layer (`gradient_checkpointing`, on its
    `GradientCheckpointingLayer`s; `every_n_layers` flags only some). A model that flags other modules only (older
    modelling code) counts as checkpointing all its layers, -1."""
    flagged = [m for m in model.modules() if getattr(m, "gradient_checkpointing", False) is True]
    layers = [m for m in flagged if isinstance(m, GradientCheckpointingLayer)]
    return len(layers) if layers or not flagged else -1


# ---------------------------------------------------------------------------------------------------------------
# Peak FLOP/s per device. Dense figures (NVIDIA's datasheets give tensor-core figures "with sparsity", twice the
# dense ones; these are the dense halves), per compute dtype. Sources:
#   H100 SXM / PCIe: NVIDIA H100 Tensor Core GPU datasheet; H200 (SXM): NVIDIA H200 Tensor Core GPU datasheet;
#   A100 40GB / 80GB (PCIe and SXM alike): NVIDIA A100 Tensor Core GPU datasheet; A10G: NVIDIA A10G datasheet (the
#   AWS part, half the A10's tensor rate); L4: NVIDIA L4 datasheet; L40S: NVIDIA L40S datasheet; RTX 4090: NVIDIA Ada
#   Lovelace architecture whitepaper, appendix (FP16/BF16 with FP32 accumulate, what PyTorch uses); V100 SXM2 /
#   PCIe: NVIDIA Tesla V100 datasheet (no bf16, no tf32: fp32 matmuls run at the fp32 rate).
# ---------------------------------------------------------------------------------------------------------------
TFLOPS = 1e12
PEAKS: dict[str, dict[str, float]] = {
    "h100-sxm": {"bf16": 989.5 * TFLOPS, "fp16": 989.5 * TFLOPS, "tf32": 494.5 * TFLOPS, "fp32": 67 * TFLOPS},
    "h100-pcie": {"bf16": 756.5 * TFLOPS, "fp16": 756.5 * TFLOPS, "tf32": 378 * TFLOPS, "fp32": 51 * TFLOPS},
    "h200": {"bf16": 989.5 * TFLOPS, "fp16": 989.5 * TFLOPS, "tf32": 494.5 * TFLOPS, "fp32": 67 * TFLOPS},
    "a100-40gb": {"bf16": 312 * TFLOPS, "fp16": 312 * TFLOPS, "tf32": 156 * TFLOPS, "fp32": 19.5 * TFLOPS},
    "a100-80gb": {"bf16": 312 * TFLOPS, "fp16": 312 * TFLOPS, "tf32": 156 * TFLOPS, "fp32": 19.5 * TFLOPS},
    "a10g": {"bf16": 70 * TFLOPS, "fp16": 70 * TFLOPS, "tf32": 35 * TFLOPS, "fp32": 35 * TFLOPS},
    "l4": {"bf16": 121 * TFLOPS, "fp16": 121 * TFLOPS, "tf32": 60 * TFLOPS, "fp32": 30.3 * TFLOPS},
    "l40s": {"bf16": 366.5 * TFLOPS, "fp16": 366.5 * TFLOPS, "tf32": 183 * TFLOPS, "fp32": 91.6 * TFLOPS},
    "rtx-4090": {"bf16": 165.2 * TFLOPS, "fp16": 165.2 * TFLOPS, "tf32": 82.6 * TFLOPS, "fp32": 82.6 * TFLOPS},
    "v100-sxm2": {"fp16": 125 * TFLOPS, "fp32": 15.7 * TFLOPS},
    "v100-pcie": {"fp16": 112 * TFLOPS, "fp32": 14 * TFLOPS},
}
# torch.cuda.get_device_name -> table entry, most specific first (e.g. "NVIDIA H100 80GB HBM3", "NVIDIA H100 PCIe",
# "NVIDIA A100-SXM4-40GB", "NVIDIA A100 80GB PCIe", "Tesla V100-SXM2-16GB"). A name none matches (an H100 NVL, a
# V100S, an A100 without its memory size) is probed, not guessed.
DEVICE_PATTERNS: tuple[tuple[str, str], ...] = (
    (r"\bh100\b.*\bpcie\b", "h100-pcie"),
    (r"\bh100\b.*\b(hbm3|sxm\w*)\b", "h100-sxm"),
    (r"\bh200\b(?!.*\bnvl\b)", "h200"),
    (r"\ba100\b.*\b40gb\b", "a100-40gb"),
    (r"\ba100\b.*\b80gb\b", "a100-80gb"),
    (r"\ba10g\b", "a10g"),
    (r"\bl4\b", "l4"),
    (r"\bl40s\b", "l40s"),
    (r"\brtx 4090\b", "rtx-4090"),
    (r"\bv100\b.*\bsxm2\b", "v100-sxm2"),
    (r"\bv100\b.*\bpcie\b", "v100-pcie"),
)


def datasheet_entry(device_name: str) -> str | None:
    """The PEAKS entry a device name (torch.cuda.get_device_name) is, or None."""
    name = device_name.lower()
    return next((entry for pattern, entry in DEVICE_PATTERNS if re.search(pattern, name)), None)


def compute_dtype(dtypes: Dtypes, device: torch.device) -> str:
    """The dtype the run's matmuls run in: autocast's, else the weights'; fp32 matmuls on CUDA run as tf32 when
    PyTorch allows it (`torch.backends.cuda.matmul.fp32_precision` / `set_float32_matmul_precision`)."""
    name = dtype_name(dtypes.autocast if dtypes.autocast is not None else dtypes.weights)
    if name == "fp32" and device.type == "cuda" and _tf32_matmuls():
        return "tf32"
    return name


def _tf32_matmuls() -> bool:
    setting = getattr(torch.backends.cuda.matmul, "fp32_precision", "none")
    if setting in ("tf32", "ieee"):
        return setting == "tf32"
    return torch.get_float32_matmul_precision() != "highest"


@dataclass(frozen=True)
class Peak:
    flops_per_s: float
    source: PeakSource
    name: str  # the datasheet entry, or what was measured


def device_peak(device: torch.device, dtype: str, device_name: str | None = None) -> Peak:
    """The peak FLOP/s of one device in `dtype` (bf16, fp16, tf32, fp32): the datasheet's for a known GPU, else a
    measured matmul probe on the device (cached per process)."""
    if device.type == "cuda":
        device_name = device_name or torch.cuda.get_device_name(device)
        entry = datasheet_entry(device_name)
        figures = PEAKS.get(entry or "", {})
        key = dtype if dtype in figures else ("fp32" if dtype == "tf32" else None)  # no tf32 units: the fp32 rate
        if key is not None:
            return Peak(figures[key], "datasheet", f"{entry} {key}")
    probe_dtype = "fp32" if dtype == "tf32" else dtype
    threads = torch.get_num_threads()
    flops, size = measured_peak(device.type, str(device), probe_dtype, threads)
    what = f"{device_name or bench_device_name(device)}: {size}x{size} {probe_dtype} matmuls"
    return Peak(flops, "measured", what + (f", {threads} threads" if device.type == "cpu" else ""))


PROBE_SECONDS = 0.5  # the probe's whole budget, over PROBE_WINDOWS windows (best one counts)
PROBE_WINDOWS = 3


@functools.cache
def measured_peak(device_type: str, device: str, dtype: str, threads: int) -> tuple[float, int]:
    """(FLOP/s, matrix size): the best of PROBE_WINDOWS windows of square matmuls in `dtype` on the device, about
    PROBE_SECONDS in all; cached per process for each device, dtype and thread count (`threads` is the key: torch's
    intra-op threads at the call)."""
    size = 4096 if device_type == "cuda" else 1024
    dt = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    gen = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn(size, size, generator=gen).to(device=device, dtype=dt)
    b = torch.randn(size, size, generator=gen).to(device=device, dtype=dt)
    out = torch.empty(size, size, device=device, dtype=dt)
    torch.mm(a, b, out=out)  # first-use costs (kernel choice, page faults) stay out of the windows
    sync(out.device)
    best = 0.0
    for _ in range(PROBE_WINDOWS):
        n, start = 0, time.perf_counter()
        while True:
            torch.mm(a, b, out=out)
            n += 1
            sync(out.device)
            elapsed = time.perf_counter() - start
            if elapsed >= PROBE_SECONDS / PROBE_WINDOWS:
                break
        best = max(best, 2.0 * size**3 * n / elapsed)
    return best, size


def train_utilisation(model: nn.Module, tr: Any, train: dict[str, Any], *, causal_lm: bool,
                      trains_all_weights: bool, trainable_params_excl_head: int, dtypes: Dtypes,
                      device: torch.device, world_size: int = 1) -> dict[str, Any]:
    """The record's `train_flops` block: FLOPs per token, achieved model and hardware FLOP/s, the peak and MFU / HFU.
    `train` is the record's `train` block (its `tokens_per_s` and `samples_per_s`: the global throughput when the
    run is distributed, so the peak is one device's times `world_size`); `tr` the loop's result
    (bench/loop/train.py TrainResult), whose timed tokens and token pairs give the attention's mean length."""
    recomputed = checkpointed_layers(model)
    out: dict[str, Any] = {
        "world_size": world_size, "weight_gradients": "all" if trains_all_weights else "trainable",
        "note": ("gradient checkpointing: hardware FLOPs add the recomputed forward of the checkpointed layers"
                 if recomputed else "no gradient checkpointing: hardware FLOPs = model FLOPs, HFU = MFU"),
    }
    try:
        arch = Architecture.from_config(unwrap(model).config, causal_lm)
    except ValueError as exc:
        return {**out, "note": str(exc)}
    tokens_per_s, samples_per_s = train.get("tokens_per_s"), train.get("samples_per_s")
    if not tokens_per_s or not samples_per_s or not tr.timed_tokens:
        return {**out, "note": "no timed steps: no throughput to count FLOPs over"}
    attention_seq_len = tr.timed_token_pairs / tr.timed_tokens
    per_s = Work(tokens_per_s, tokens_per_s * attention_seq_len, samples_per_s)  # one second's work
    adapters = 0 if trains_all_weights else int(trainable_params_excl_head)
    model_per_s = training_flops(arch, per_s, Trainable(trains_all_weights, adapters))
    layers = arch.layers if recomputed < 0 else recomputed
    hardware_per_s = model_per_s + (recompute_flops(arch, per_s, adapters, layers) if layers else 0.0)
    dtype = compute_dtype(dtypes, device)
    peak = device_peak(device, dtype)
    return {
        **out,
        "checkpointed_layers": layers, "attention_seq_len": attention_seq_len,
        "forward_flops_per_token": forward_flops(arch, per_s, adapters) / tokens_per_s,
        "model_flops_per_token": model_per_s / tokens_per_s,
        "hardware_flops_per_token": hardware_per_s / tokens_per_s,
        "model_flops_per_s": model_per_s, "hardware_flops_per_s": hardware_per_s,
        "compute_dtype": dtype, "peak_flops_per_s": peak.flops_per_s, "peak_source": peak.source,
        "peak_name": peak.name,
        "mfu_ratio": model_per_s / (peak.flops_per_s * world_size),
        "hfu_ratio": hardware_per_s / (peak.flops_per_s * world_size),
    }
