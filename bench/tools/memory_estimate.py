"""Training-memory estimator (the arithmetic): full fine-tuning vs LoRA vs QLoRA, from a model config, a
parameter count or a named preset. Its command line and the estimate-vs-records comparison are
analysis/memory.py; the benchmark scripts in bench/tools/perf/ use this module directly.

    python -m analysis.memory --model minilm --batch-size 32 --seq-len 128 --rank 8
    python -m analysis.memory --model 7b --batch-size 1 --seq-len 2048 --precision amp --grad-checkpointing
    python -m analysis.memory --params 3e9 --plot memory.png --gpu h100-80gb
    python -m analysis.memory --records results/runs          # estimate vs measured peak for CUDA runs

`--model` takes a `conf/model/<name>.yaml` name (random-init configs, the offline MiniLM package), a folder
or config.json path, a preset (`7b`, `13b`, `70b`: Llama-2 shapes), or a Hub id already in the local cache
(never the network). The model is built on the `meta` device, so parameter and LoRA counts are exact and
nothing is allocated.

What is counted, in bytes (P = all parameters, T = trainable ones):
- weights: 4 P (fp32 and `amp`, PyTorch autocast over fp32 weights: what this suite does on CUDA), 2 P under
  `bf16-mixed` (16-bit weights with fp32 master copies), and for QLoRA 0.5 byte per quantised linear weight
  (NF4) plus its quantisation constants (fp32 absmax per 64 values = 1/16 byte/param; with double
  quantisation 8-bit absmax plus an fp32 constant per 256 of them = 1/64 + 1/4096 byte/param), the rest fp32;
- master weights: 4 T under `bf16-mixed`, else none;
- gradients: 4 T (2 T under `bf16-mixed`);
- optimiser: AdamW keeps two moments per trainable parameter: 8 T in 32 bits, 2 T for 8-bit AdamW
  (bitsandbytes, also its paged variant; paging moves states to CPU only under memory pressure, so they are
  counted on the GPU here);
- autocast weight copies (`amp`): autocast casts each linear weight to 16 bits per use and autograd keeps the
  copy for the backward pass: 2 bytes per linear weight of the layers (QLoRA dequantises one layer at a time
  instead);
- activations kept for the backward pass, per layer, for s tokens x b sequences, hidden h, FFN width f,
  a heads:  alpha*s*b*h + beta*s*b*f + gamma*a*s^2*b  bytes.  Korthikanti et al. 2022 ("Reducing Activation
  Recomputation in Large Transformer Models") give s*b*h*(34 + 5*a*s/h) for pure 16-bit activations; PyTorch
  autocast keeps LayerNorm/softmax/residual tensors in fp32 and casts inputs per linear layer, so the
  coefficients here were measured instead, by summing the bytes of the tensors autograd saves in a BERT layer
  (torch 2.x, `torch.autograd.graph.saved_tensors_hooks`): fp32 alpha 40, beta 8; amp alpha 34, beta 4;
  gamma 12 when attention scores are materialised (eager attention, CPU fp32), 0 with fused attention (SDPA
  flash / memory-efficient kernels on CUDA). LoRA keeps slightly less (frozen linear layers need no input
  for a weight gradient: alpha -12 fp32, -6 amp, measured with LoRA on query/value). A SwiGLU MLP (Llama)
  keeps four f-wide tensors instead of two (beta doubled); no dropout masks (alpha -2). Embeddings: 12 s*b*h
  for full fine-tuning; -4 s*b*h for LoRA/QLoRA (frozen embeddings keep nothing, the first layer keeps less).
  Gradient checkpointing keeps only each layer's input (4 s*b*h) plus one layer's full activations.
- optimiser step working memory: fused AdamW (this suite on CUDA) and 8-bit AdamW update in place, 0; the
  foreach implementation takes one fp32 temporary per trainable parameter (the square root of the second
  moment, for all tensors at once), 4 T; the single-tensor one (PyTorch's choice on CPU) two temporaries of the
  largest trainable tensor, 8 bytes per element of it (measured: `python -m bench.tools.perf.memory`).
- peak = weights + master + optimiser + the larger of
  (a) max(activations + autocast copies, gradients) + one layer's activations as backward working memory:
      activations are freed and gradients created as the backward pass walks down the layers (gradients are
      None during the forward pass: zero_grad(set_to_none=True)), and
  (b) gradients + the optimiser step's working memory.

- causal LMs (conf/model/family/llama.yaml, SmolLM2, the Llama presets): parameters counted from the config
  on the meta device (tied LM head counted once; no task head, so LoRA trains only its adapters); the layers as
  above with the SwiGLU MLP; and the loss over the vocabulary, usually the largest activation: log_softmax keeps
  fp32 log-probabilities of every position, 4 bytes x tokens x vocab (kept until the backward pass), and the
  backward pass starts with two fp32 tokens x vocab gradients at once, 8 bytes x tokens x vocab (the backward
  working memory when larger than one layer's). Measured on tiny-llama, fp32 on the CPU, with
  `bench.tools.perf.memory` (live tensor bytes of the suite's loop): full 115.4 MB measured vs 115.8 MB estimated,
  LoRA 89.4 vs 89.7 MB (batch 4 x 32 tokens, vocabulary 49152). Under autocast the logits are 16-bit before the
  fp32 cast; that path (CUDA) has not been measured for causal LMs. Tokens are the run's batch x its longest
  padded batch (`train.max_batch_seq_len`), as every position gets logits even with the loss on the answer only.
  A run record of another method than full/lora/qlora (IA3, prompt tuning, ...) is modelled as a frozen base with
  the record's trainable count (`record_setting`).

Not counted: the CUDA context (~0.3-0.6 GiB, outside PyTorch's allocator), cuBLAS workspaces, the caching
allocator's fragmentation (measured as reserved - allocated), and the data batch. So compare with
`peak_allocated_bytes`, not with nvidia-smi.
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from bench import BenchError
from bench.config import CONF, compose_config
from bench.data.tasks import record_num_labels
from bench.model import package_model_dir

GIB = 2**30
METHODS = ("full", "lora", "qlora")
PRECISIONS = ("fp32", "amp", "bf16-mixed")
OPTIMIZERS = {"adamw": 8.0, "adamw8bit": 2.0, "paged_adamw8bit": 2.0, "paged_adamw32bit": 8.0}
OPTIMIZER_IMPLS = ("fused", "foreach", "single_tensor")  # torch AdamW implementations (fused: in place)
GPUS_GIB = {"t4": 16, "l4": 24, "rtx4090": 24, "a10g": 24, "a100-40gb": 40, "a100-80gb": 80, "h100-80gb": 80,
            "h200": 141}
# Llama-2 shapes (Touvron et al. 2023): hidden, layers, heads, kv heads, FFN width, vocabulary.
PRESETS = {"7b": (4096, 32, 32, 32, 11008, 32000), "13b": (5120, 40, 40, 40, 13824, 32000),
           "70b": (8192, 80, 64, 8, 28672, 32000)}
NF4_BYTES = 0.5
# A causal LM's loss over the vocabulary (transformers' ForCausalLMLoss: fp32 logits -> cross entropy), bytes per
# token x vocabulary entry, measured on tiny-llama with bench.tools.perf.memory (fp32, CPU): log_softmax keeps its fp32
# output for the backward pass (4); the backward pass starts with two dense fp32 tokens x vocab gradients alive at
# once (the loss's gradient w.r.t. the log-probabilities and w.r.t. the logits: 8).
LOGITS_KEPT_BYTES = 4.0
LOGITS_BACKWARD_BYTES = 8.0
QUANT_CONST_BYTES = {True: 1 / 64 + 4 / (64 * 256), False: 4 / 64}  # double quantisation on / off


@dataclass(frozen=True)
class Arch:
    """What the estimator needs to know about a model; `linears` maps module names to (in, out, bias)."""

    name: str
    params: int
    hidden: int
    layers: int
    heads: int
    ffn: int
    vocab: int
    swiglu: bool
    dropout: bool
    causal_lm: bool
    head_params: int  # the task head (trains for every method; 0 for a causal LM)
    largest_param: int = 0  # elements of the largest parameter tensor (usually the token embedding)
    linears: dict[str, tuple[int, int, bool]] = field(default_factory=dict, repr=False)

    @property
    def layer_linear_params(self) -> int:
        """Weights of the linear layers inside the transformer blocks (quantised by QLoRA, copied by autocast)."""
        return sum(i * o for n, (i, o, _) in self.linears.items() if ".layers." in n or ".layer." in n)

    @property
    def quantisable_params(self) -> int:
        """Linear weights bitsandbytes quantises: every nn.Linear except the task head / LM head."""
        return sum(i * o for n, (i, o, _) in self.linears.items() if not _is_head(n))


def _is_head(name: str) -> bool:
    """The task head as the runs train it (conf/model/family `head`: BERT's pooler too) or a causal LM's head."""
    parts = name.split(".")
    return parts[0] in ("classifier", "score", "lm_head") or "pooler" in parts


def arch_from_config(config: Any, name: str = "model") -> Arch:
    """Build the model on the meta device (no memory) and read its shapes."""
    import torch
    from torch import nn
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    causal = any(a.endswith("ForCausalLM") for a in (getattr(config, "architectures", None) or [])) \
        or config.model_type in ("llama", "mistral", "qwen2", "gpt2", "gpt_neox", "opt", "phi", "gemma")
    with torch.device("meta"):
        model = (AutoModelForCausalLM if causal else AutoModelForSequenceClassification).from_config(config)
    linears = {n: (m.in_features, m.out_features, m.bias is not None)
               for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    params = sum(p.numel() for p in model.parameters())
    head = 0 if causal else sum(p.numel() for n, p in model.named_parameters() if _is_head(n))
    hidden = int(config.hidden_size)
    act = str(getattr(config, "hidden_act", "gelu"))
    return Arch(name=name, params=params, hidden=hidden, layers=int(config.num_hidden_layers),
                heads=int(config.num_attention_heads), ffn=int(getattr(config, "intermediate_size", 4 * hidden)),
                vocab=int(config.vocab_size), swiglu=act == "silu",
                dropout=float(getattr(config, "hidden_dropout_prob", getattr(config, "attention_dropout", 0.0))
                              or 0.0) > 0,
                causal_lm=causal, head_params=head, linears=linears,
                largest_param=max(p.numel() for p in model.parameters()))


def llama_like(params: float | None = None, preset: str | None = None) -> Arch:
    """A Llama-shaped model: a named preset, or a shape fitted to a parameter count (hidden h ~ (128N/12)^(1/3)
    rounded to 128, head size 128, SwiGLU FFN 8h/3, layers from the count)."""
    from transformers import LlamaConfig

    if preset is not None:
        h, n_layers, heads, kv, ffn, vocab = PRESETS[preset]
        name = preset
    else:
        vocab = 32000
        h = max(128, int(round((params * 128 / 12) ** (1 / 3) / 128)) * 128)
        heads = kv = h // 128
        ffn = int(round(8 * h / 3 / 256)) * 256
        n_layers = max(1, int(round((params - 2 * vocab * h) / (4 * h * h + 3 * h * ffn))))
        name = f"llama-like-{params / 1e9:g}B"
    cfg = LlamaConfig(hidden_size=h, num_hidden_layers=n_layers, num_attention_heads=heads, num_key_value_heads=kv,
                      intermediate_size=ffn, vocab_size=vocab)
    return arch_from_config(cfg, name)


def arch_from_model_conf(model_cfg: dict, num_labels: int = 2) -> Arch:
    """From a `conf/model/*.yaml` dict (as in a record's effective_config): random-init config, the package's
    config.json, or a Hub id in the local cache."""
    from transformers import AutoConfig

    if model_cfg.get("random_init"):
        cfg = AutoConfig.for_model(model_cfg["family"], num_labels=num_labels, **dict(model_cfg.get("config") or {}))
        return arch_from_config(cfg, model_cfg["name"])
    gguf = model_cfg.get("gguf_file")
    folder = package_model_dir(model_cfg["package"], model_cfg.get("package_subdir", "model"), gguf) \
        if model_cfg.get("package") else None
    if folder is not None and gguf:  # a GGUF (SmolLM2): its config from the file's metadata, no dequantising
        from transformers import AutoConfig

        return arch_from_config(AutoConfig.from_pretrained(str(folder), gguf_file=gguf), model_cfg["name"])
    source = str(folder) if folder else model_cfg.get("hub_id")
    return arch_from_config(_offline_config(source, num_labels), model_cfg["name"])


def _offline_config(source: str, num_labels: int = 2) -> Any:
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(source, num_labels=num_labels, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise BenchError(f"no offline config for '{source}' (not a conf/model name, preset, folder or cached Hub "
                         f"id); use --params N or a preset ({', '.join(PRESETS)})") from exc


def resolve_arch(model: str | None, params: float | None) -> Arch:
    """--model NAME|PATH|PRESET|HUB_ID or --params N."""
    from omegaconf import OmegaConf

    if params is not None:
        return llama_like(params=params)
    if model is None:
        model = "minilm"
    if model.lower() in PRESETS:
        return llama_like(preset=model.lower())
    if (CONF / "model" / f"{model}.yaml").is_file():  # composed: family module names included
        return arch_from_model_conf(OmegaConf.to_container(compose_config([f"model={model}"]).model, resolve=True))
    return arch_from_config(_offline_config(model), model)


# ---------------------------------------------------------------- arithmetic


def lora_targets(arch: Arch, targets: Iterable[str]) -> list[tuple[int, int]]:
    """(in, out) of every linear layer LoRA adapts: its name is a target or ends with '.target' (peft's
    matching rule), the task head excluded."""
    targets = list(targets)
    return [(i, o) for n, (i, o, _) in arch.linears.items()
            if not _is_head(n) and any(n == t or n.endswith("." + t) for t in targets)]


def lora_trainable(arch: Arch, rank: int, targets: Iterable[str]) -> int:
    """LoRA parameters: r*(in + out) for every adapted linear layer."""
    return sum(rank * (i + o) for i, o in lora_targets(arch, targets))


def training_state_bytes(total_params: float, trainable_params: float, precision: str = "fp32",
                         optimizer: str = "adamw") -> dict[str, float]:
    """Weights, master weights, gradients and optimiser states of an unquantised model (bytes)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision}: choose one of {PRECISIONS}")
    half = precision == "bf16-mixed"
    return {"weights_bytes": (2 if half else 4) * total_params,
            "master_weights_bytes": 4 * trainable_params if half else 0.0,
            "gradients_bytes": (2 if half else 4) * trainable_params,
            "optimizer_bytes": OPTIMIZERS[optimizer] * trainable_params}


def activation_bytes_per_layer(arch: Arch, batch: int, seq: int, precision: str, fused_attention: bool,
                               lora: bool = False) -> float:
    """Bytes autograd keeps per transformer layer (see the module docstring for the coefficients)."""
    fp32 = precision == "fp32"
    alpha, beta = (40.0, 8.0) if fp32 else (34.0, 4.0)
    if lora:
        alpha -= 12.0 if fp32 else 6.0
    if arch.swiglu:
        beta *= 2
    if not arch.dropout:
        alpha -= 2.0
    gamma = 0.0 if fused_attention else 12.0
    sb = seq * batch
    return alpha * sb * arch.hidden + beta * sb * arch.ffn + gamma * arch.heads * seq * seq * batch


def optimizer_working_bytes(arch: Arch, method: str, rank: int, targets: Iterable[str], trainable: float,
                            optimizer: str, impl: str) -> float:
    """Temporaries of one AdamW step (see the module docstring): 0 fused or 8-bit, 4 bytes per trainable
    parameter foreach, 8 bytes per element of the largest trainable tensor single-tensor."""
    if impl not in OPTIMIZER_IMPLS:
        raise ValueError(f"optimizer implementation {impl}: choose one of {OPTIMIZER_IMPLS}")
    if impl == "fused" or OPTIMIZERS[optimizer] < 8:
        return 0.0
    if impl == "foreach":
        return 4.0 * trainable
    if method == "full":
        return 8.0 * arch.largest_param
    lora = [rank * max(i, o) for i, o in lora_targets(arch, targets)]
    # a causal LM's LM head is frozen under LoRA (no task head trains); a classifier's head trains
    head = [] if arch.causal_lm else [i * o for n, (i, o, _) in arch.linears.items() if _is_head(n)]
    return 8.0 * max(lora + head + [0])


@dataclass
class Setting:
    method: str
    rank: int = 8
    targets: tuple[str, ...] = ("query", "value")
    batch: int = 32
    seq: int = 128
    precision: str = "amp"
    optimizer: str = "adamw"
    optimizer_impl: str = "fused"
    fused_attention: bool = True
    grad_checkpointing: bool = False
    double_quant: bool = True
    trainable: int | None = None  # a method's own trainable count (record_setting); None: counted for the method


def estimate(arch: Arch, s: Setting) -> dict[str, float]:
    """Memory components and the estimated peak (bytes) for one method on one model."""
    if s.method not in METHODS:
        raise ValueError(f"method {s.method}: choose one of {METHODS}")
    if s.method == "full":
        trainable = arch.params
    elif s.trainable is not None:
        trainable = s.trainable
    else:
        trainable = lora_trainable(arch, s.rank, s.targets) + arch.head_params
    out: dict[str, float] = {"total_params": float(arch.params), "trainable_params": float(trainable)}
    if s.method == "qlora":
        quantised = arch.quantisable_params
        rest = arch.params - quantised
        out["weights_bytes"] = quantised * (NF4_BYTES + QUANT_CONST_BYTES[s.double_quant]) + 4 * (rest + trainable)
        out["master_weights_bytes"] = 0.0
        out["gradients_bytes"] = 4.0 * trainable
        out["optimizer_bytes"] = OPTIMIZERS[s.optimizer] * trainable
        # one layer's weights dequantised to 16 bits at a time (forward and backward)
        copies = 2.0 * arch.layer_linear_params / max(arch.layers, 1)
    else:
        out.update(training_state_bytes(arch.params, trainable, s.precision, s.optimizer))
        copies = 2.0 * arch.layer_linear_params if s.precision == "amp" else 0.0
    precision = "amp" if s.method == "qlora" else s.precision
    per_layer = activation_bytes_per_layer(arch, s.batch, s.seq, precision, s.fused_attention, s.method != "full")
    tokens = s.batch * s.seq
    # outside the layers: embeddings (+12 s*b*h); with frozen embeddings nothing before the first adapter is
    # kept, which also trims the first layer (-4 s*b*h, measured)
    outside = (12.0 if s.method == "full" else -4.0) * tokens * arch.hidden \
        + (LOGITS_KEPT_BYTES * tokens * arch.vocab if arch.causal_lm else 0.0)
    if s.grad_checkpointing:
        layers_kept = arch.layers * 4.0 * tokens * arch.hidden + per_layer
    else:
        layers_kept = arch.layers * per_layer
    out["activations_bytes"] = layers_kept + outside
    out["autocast_weight_copies_bytes"] = copies
    # a causal LM's backward starts at the loss over the vocabulary: two fp32 tokens x vocab gradients at once
    head_working = LOGITS_BACKWARD_BYTES * tokens * arch.vocab if arch.causal_lm else 0.0
    out["backward_working_bytes"] = max(per_layer, head_working)
    out["optimizer_step_working_bytes"] = optimizer_working_bytes(arch, s.method, s.rank, s.targets, trainable,
                                                                  s.optimizer, s.optimizer_impl)
    if s.trainable is not None:  # a method's own tensors, shapes unknown here: at most 8 bytes per trainable one
        out["optimizer_step_working_bytes"] = min(out["optimizer_step_working_bytes"], 8.0 * trainable)
    fixed = out["weights_bytes"] + out["master_weights_bytes"] + out["optimizer_bytes"]
    backward = max(out["activations_bytes"] + copies, out["gradients_bytes"]) + out["backward_working_bytes"]
    out["peak_bytes"] = fixed + max(backward, out["gradients_bytes"] + out["optimizer_step_working_bytes"])
    out["sum_of_parts_bytes"] = fixed + out["gradients_bytes"] + out["activations_bytes"] + copies
    return out


# Methods that prepend `rank` virtual tokens to every sequence (the activations grow with them).
VIRTUAL_TOKEN_METHODS = ("prompt_tuning", "p_tuning")


def record_setting(rec: dict) -> tuple[Setting, str]:
    """The estimator's setting for an ok run record, and what the run's method is modelled as.

    full, lora and qlora are modelled as themselves. Any other method (IA3, prompt tuning, DoRA, adapters, ...)
    is modelled as a frozen base model with the record's own `trainable_params` (weights, gradients and AdamW
    states exact from that count; activations those of LoRA, i.e. of a frozen base, plus the virtual tokens
    prompt tuning prepends): the extra activations a method keeps itself (DoRA's norms, adapters' bottlenecks,
    IA3's scaled copies) are not modelled."""
    eff = rec["effective_config"]
    method_cfg = eff["method"]
    method = str(rec["method"])
    seq = int((rec.get("train") or {}).get("max_batch_seq_len") or eff["budget"]["max_seq_len"])
    trainable = None
    modelled_as = method
    if method not in METHODS:
        trainable = int(rec["trainable_params"])
        modelled_as = "frozen base + the record's trainable parameters"
        if method in VIRTUAL_TOKEN_METHODS and rec.get("rank"):
            seq += int(rec["rank"])
            modelled_as += f" (+{int(rec['rank'])} virtual tokens)"
    device_type = str(eff.get("device_type") or "cpu")
    st = Setting(method=method if method in METHODS else "lora", rank=rec.get("rank") or 8,
                 targets=tuple(method_cfg.get("target_modules") or ()), batch=int(eff["budget"]["batch_size"]),
                 seq=seq, precision="fp32" if eff["precision"] == "fp32" else "amp",
                 fused_attention=device_type == "cuda",
                 # bench.train: fused AdamW on CUDA, torch's default (single-tensor) elsewhere
                 optimizer_impl="fused" if device_type == "cuda" else "single_tensor",
                 grad_checkpointing=bool(method_cfg.get("gradient_checkpointing", False)),
                 double_quant=bool(method_cfg.get("double_quant", True)), trainable=trainable)
    return st, modelled_as


def record_estimate(rec: dict) -> dict[str, Any]:
    """Estimate vs measured training peak for one ok record (measured: memory.train.peak_allocated_bytes, on
    CUDA only; a CPU record's peak RSS is given as `measured_rss_bytes`, not compared: it holds the Python
    process, the data and the allocator's free lists too). Methods other than full/lora/qlora: `record_setting`."""
    mem = (rec.get("memory") or {}).get("train") or {}
    eff = rec["effective_config"]
    arch = arch_from_model_conf(eff["model"], num_labels=record_num_labels(rec))
    st, modelled_as = record_setting(rec)
    est = estimate(arch, st)
    row = {"run_id": rec["run_id"], "method": rec["method"], "params": arch.params, "batch": st.batch,
           "seq": st.seq, "estimate_bytes": est["peak_bytes"], "kind": mem.get("kind"), "modelled_as": modelled_as,
           "causal_lm": arch.causal_lm, "parts": est}
    if mem.get("kind") == "cuda":
        row["measured_bytes"] = mem["peak_allocated_bytes"]
        row["estimate_over_measured_ratio"] = est["peak_bytes"] / mem["peak_allocated_bytes"]
    elif mem.get("peak_rss_bytes"):
        row["measured_rss_bytes"] = mem["peak_rss_bytes"]
    return row
