"""Training-memory estimator (the arithmetic): full fine-tuning vs LoRA vs QLoRA, from a model config, a
parameter count or a named preset. Its command line and the estimate-vs-records comparison are
analysis/memory.py; the benchmark scripts in bench/tools/perf/ use this module directly.

    python -m analysis.memory --model minilm --batch-size 32 --seq-len 128 --rank 8
    python -m analysis.memory --model 7b --batch-size 1 --seq-len 2048 --precision bf16 --grad-checkpointing
    python -m analysis.memory --params 3e9 --plot memory.png --gpu h100-80gb
    python -m analysis.memory --records results/runs          # estimate vs measured peak for CUDA runs

`--model` takes a `conf/model/<name>.yaml` name (random-init configs, the offline MiniLM package), a folder
or config.json path, a preset (`7b`, `13b`, `70b`: Llama-2 shapes), or a Hub id already in the local cache
(never the network). The model is built on the `meta` device, so parameter and LoRA counts are exact and
nothing is allocated.

What is counted, in bytes (F = frozen parameters, T = trainable ones: adapters and the task head, or every
parameter for full fine-tuning). The precisions are the suite's (bench/model/precision.py), plus `bf16-master`:
- weights: F frozen and T trainable parameters at their dtype's size:
  `fp32` 4 F + 4 T; `bf16` (this suite's default on CUDA) 2 F + 4 T, and for full fine-tuning (F = 0) 2 T, pure
  bf16 as peft's benchmark and torchtune hold it; `bf16-mixed` / `fp16-mixed` (autocast over fp32 weights) 4 F + 4 T;
  `bf16-master` (16-bit weights with fp32 master copies, as Megatron and DeepSpeed hold them; not a mode of this
  suite) 2 F + 2 T; and for QLoRA 0.5 byte per quantised linear weight (NF4) plus its quantisation constants (fp32
  absmax per 64 values = 1/16 byte/param; with double quantisation 8-bit absmax plus an fp32 constant per 256 of
  them = 1/64 + 1/4096 byte/param), the rest fp32 (peft's `prepare_model_for_kbit_training` casts it) whatever the
  precision;
- master weights: 4 T under `bf16-master`, else none;
- gradients: one per trainable parameter in its dtype: 4 T, 2 T for full fine-tuning under `bf16` and under
  `bf16-master`;
- optimiser: AdamW keeps two moments per trainable parameter in that parameter's dtype (torch's AdamW makes them
  like the parameter; `bf16-master`: like the fp32 master): 8 T in fp32, 4 T for full fine-tuning under `bf16`;
  2 T for 8-bit AdamW (bitsandbytes, also its paged variant; paging moves states to CPU only under memory pressure,
  so they are counted on the GPU here), 8 T for bitsandbytes' 32-bit paged AdamW;
- autocast weight copies: autocast casts each fp32 weight a linear layer uses to 16 bits per use and autograd keeps
  the copy for the backward pass: 2 bytes per linear weight of the layers under `bf16-mixed` / `fp16-mixed`; under
  `bf16` only the trainable fp32 tensors are cast (2 T; none for full fine-tuning, already bf16); QLoRA dequantises
  one layer at a time instead. With gradient checkpointing autograd keeps none of them across layers (a test counts
  the saved bf16 weight copies of a Llama under CPU autocast: one per linear weight without, but the first layer's
  q, k, v, whose input needs no gradient; none with): one layer's
  copies, made again when its forward is recomputed;
- activations kept for the backward pass, per layer, for s tokens x b sequences, hidden h, FFN width f,
  a heads:  alpha*s*b*h + beta*s*b*f + gamma*a*s^2*b  bytes.  Korthikanti et al. 2022 ("Reducing Activation
  Recomputation in Large Transformer Models") give s*b*h*(34 + 5*a*s/h) for pure 16-bit activations; PyTorch
  autocast keeps LayerNorm/softmax/residual tensors in fp32 and casts inputs per linear layer, so the
  coefficients here were measured instead, by summing the bytes of the tensors autograd saves in a BERT layer
  (torch 2.x, `torch.autograd.graph.saved_tensors_hooks`): fp32 alpha 40, beta 8; under autocast alpha 34, beta 4
  (measured over fp32 weights; used for every 16-bit precision, an upper bound where the residual stream stays
  16-bit, as in a Llama with bf16 weights);
  gamma 12 when attention scores are materialised (eager attention, CPU fp32), 0 with fused attention (SDPA
  flash / memory-efficient kernels on CUDA). LoRA keeps slightly less (frozen linear layers need no input
  for a weight gradient: alpha -12 fp32, -6 under autocast, measured with LoRA on query/value). A SwiGLU MLP (Llama)
  keeps four f-wide tensors instead of two (beta doubled); no dropout masks (alpha -2). Embeddings: 12 s*b*h
  for full fine-tuning; -4 s*b*h for LoRA/QLoRA (frozen embeddings keep nothing, the first layer keeps less).
  Gradient checkpointing keeps only each layer's input (4 s*b*h) plus one layer's full activations.
- optimiser step working memory: fused AdamW (this suite on CUDA) and 8-bit AdamW update in place, 0; the
  foreach implementation takes one temporary per trainable parameter in the moments' dtype (the square root of the
  second moment, for all tensors at once), 4 T in fp32; the single-tensor one (PyTorch's choice on CPU) two
  temporaries of the largest trainable tensor, 8 bytes per element of it in fp32 (measured:
  `python -m bench.tools.perf.memory`).
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
- a run record is modelled at its own precision; a record whose effective config says `bf16` or `fp16` without a
  `weight_dtype` ran autocast over fp32 weights: `bf16-mixed` / `fp16-mixed` (`record_precision`).

Per GPU, for one run over N GPUs (`Setting.strategy`, `Setting.gpus`; conf/distributed/). `batch` is then the
micro-batch each GPU computes (the suite splits its global `budget.batch_size` over the ranks), so activations, autocast
copies and the backward working memory are per GPU and not divided.
- `none`: one process, the figures above (N = 1).
- `ddp` (DistributedDataParallel): every GPU holds everything above, plus DDP's gradient buckets. DDP packs the
  gradients of the parameters that require one (frozen ones are never reduced) into flat buckets of `bucket_cap_mb`
  (25 MiB by default; the cap sets how many buckets there are, not their total) that are allocated when the model is
  wrapped and live as long as it. With `gradient_as_bucket_view=False` (torch's default) `param.grad` is a separate
  tensor copied into its bucket, so the buckets are one more copy of the trainable gradients, in their dtype: +G
  (torch's own docs of `gradient_as_bucket_view`: the saving "will be equal to the total gradients size"). A test
  checks it on gloo: the bucket buffers DDP hands to a communication hook hold exactly the trainable gradients'
  bytes, and no gradient is a view of them unless `gradient_as_bucket_view=True` (then +0). For LoRA G is the
  adapters' and the head's: tens of MB next to a replica of GBs.
- `fsdp` (FSDP2, `fully_shard` on every transformer block, then on the root: embeddings, final norm and the heads):
  weights, master copies, gradients, optimiser states and the optimiser step's temporaries are divided by N
  (frozen and trainable parameters alike; FSDP pads each parameter to a multiple of N rows, not counted). On top, per
  GPU, the unsharded working set, in the dtype each parameter is stored in (16-bit frozen weights stay 16-bit,
  fp32 adapters fp32; QLoRA's packed 4-bit storage all-gathers as 0.5 byte per weight):
  the root's parameters, gathered at the start of the forward pass and kept until the end of the backward pass,
  and 2 blocks (`FSDP_UNITS_IN_FLIGHT`: the block computing and the next one, whose all-gather FSDP2 issues early);
  during the backward pass also the unsharded gradients of the root's and of one block's trainable parameters,
  before they are reduce-scattered. With `reshard_after_forward=False` (ZeRO-2-like) no block is freed after its
  forward, so the gathered set is the root and every block: the whole unsharded model, from the end of the forward
  pass into the backward pass, on top of its 1/N shard. Parameters then cost (1 + 1/N) x their bytes per GPU,
  more than DDP's one copy: only gradients and optimiser states are saved, which for LoRA are small.
  QLoRA under FSDP needs the 4-bit weights stored in a 16-bit dtype (`bnb_4bit_quant_storage`, peft's
  docs/source/accelerate/fsdp.md), so that they shard like bf16 tensors; the bytes per weight are the same 0.5. Its
  quantisation constants are module state, not parameters, so FSDP does not shard them: counted whole on every GPU.
  With N = 1 FSDP still all-gathers into separate buffers: `none` plus the working set.
  Checked on CPU with a fake process group (torch's `FakeStore`): every GPU's local shards of the parameters,
  gradients and AdamW states are 1/N of the whole, and with `reshard_after_forward=False` every unit is unsharded
  when the last block runs; with `True` the root and the running block are (no overlap on the CPU: the estimate's
  second block is the GPU's prefetch).
- peak per GPU = weights + master + optimiser + DDP buckets + the larger of
  (a) FSDP's gathered parameters and unsharded gradients + max(activations + autocast copies, gradients) +
      backward working memory, and (b) gradients + the optimiser step's working memory.

Not counted: the CUDA context (~0.3-0.6 GiB, outside PyTorch's allocator), cuBLAS workspaces, NCCL's communication
buffers (outside it too), CPU offloading, the caching allocator's fragmentation (measured as reserved - allocated), and
the data batch. So compare with `peak_allocated_bytes`, not with nvidia-smi.
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from bench import BenchError
from bench.config import CONF, compose_config
from bench.data.tasks import record_num_labels
from bench.model import package_model_dir
from bench.model.distributed import STRATEGIES, blocks

GIB = 2**30
METHODS = ("full", "lora", "qlora")
# The suite's precision modes (bench/model/precision.py MODES) and `bf16-master`: 16-bit weights, fp32 master copies.
PRECISIONS = ("fp32", "bf16", "bf16-mixed", "fp16-mixed", "bf16-master")
AUTOCAST_OVER_FP32 = ("bf16-mixed", "fp16-mixed")
# AdamW's two moments, bytes per trainable parameter: None = in the parameter's dtype (torch's AdamW), else fixed.
OPTIMIZERS: dict[str, float | None] = {"adamw": None, "adamw8bit": 2.0, "paged_adamw8bit": 2.0,
                                       "paged_adamw32bit": 8.0}
OPTIMIZER_IMPLS = ("fused", "foreach", "single_tensor")  # torch AdamW implementations (fused: in place)
GPUS_GIB = {"t4": 16, "l4": 24, "rtx4090": 24, "a10g": 24, "a100-40gb": 40, "a100-80gb": 80, "h100-80gb": 80,
            "h200": 141}
# Llama shapes: hidden, layers, heads, kv heads, FFN width, vocabulary. `7b`, `13b`, `70b`: Llama-2 (Touvron et al.
# 2023); `8b`, `llama3-70b`: Llama-3 / 3.1 (their config.json: 128256-entry vocabulary, untied LM head).
PRESETS = {"7b": (4096, 32, 32, 32, 11008, 32000), "13b": (5120, 40, 40, 40, 13824, 32000),
           "70b": (8192, 80, 64, 8, 28672, 32000), "8b": (4096, 32, 32, 8, 14336, 128256),
           "llama3-70b": (8192, 80, 64, 8, 28672, 128256)}
NF4_BYTES = 0.5
# FSDP2 blocks unsharded at once with reshard_after_forward=True: the one computing and the next (prefetched).
FSDP_UNITS_IN_FLIGHT = 2
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
    block_params: int = 0  # parameters of the largest transformer block (FSDP's shard unit); 0: not found
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
    layers = int(config.num_hidden_layers)
    try:  # FSDP's shard units, found as the run finds them (bench/model/distributed.py)
        units = blocks(model)
    except BenchError:
        units = []
    head = 0 if causal else sum(p.numel() for n, p in model.named_parameters() if _is_head(n))
    hidden = int(config.hidden_size)
    act = str(getattr(config, "hidden_act", "gelu"))
    return Arch(name=name, params=params, hidden=hidden, layers=layers,
                heads=int(config.num_attention_heads), ffn=int(getattr(config, "intermediate_size", 4 * hidden)),
                vocab=int(config.vocab_size), swiglu=act == "silu",
                dropout=float(getattr(config, "hidden_dropout_prob", getattr(config, "attention_dropout", 0.0))
                              or 0.0) > 0,
                causal_lm=causal, head_params=head, linears=linears,
                largest_param=max(p.numel() for p in model.parameters()),
                block_params=max((sum(p.numel() for p in b.parameters()) for b in units), default=0))


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


def weight_bytes(precision: str, trains_all: bool) -> tuple[float, float, float]:
    """Bytes per parameter under a precision: (frozen weight, trainable weight, fp32 master copy); a trainable
    parameter's gradient is as large as the trainable weight."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision}: choose one of {PRECISIONS}")
    if precision == "bf16":
        return 2.0, 2.0 if trains_all else 4.0, 0.0
    if precision == "bf16-master":
        return 2.0, 2.0, 4.0
    return 4.0, 4.0, 0.0


def moment_bytes(precision: str, optimizer: str, trains_all: bool) -> float:
    """AdamW's two moments, bytes per trainable parameter: in the dtype of what it updates (the parameter, or its
    fp32 master copy) for torch's AdamW; fixed for bitsandbytes' optimisers."""
    fixed = OPTIMIZERS[optimizer]
    if fixed is not None:
        return fixed
    _, trainable, master = weight_bytes(precision, trains_all)
    return 2.0 * (master or trainable)


def training_state_bytes(total_params: float, trainable_params: float, precision: str = "fp32",
                         optimizer: str = "adamw", trains_all: bool | None = None) -> dict[str, float]:
    """Weights, master weights, gradients and optimiser states of an unquantised model (bytes); `total_params`
    counts the trainable ones too (the frozen ones are the rest). `trains_all` (default: every parameter trains):
    full fine-tuning, whose trainable weights take the frozen weights' dtype under `bf16`."""
    trains_all = trainable_params >= total_params if trains_all is None else trains_all
    frozen, trainable, master = weight_bytes(precision, trains_all)
    return {"weights_bytes": frozen * (total_params - trainable_params) + trainable * trainable_params,
            "master_weights_bytes": master * trainable_params,
            "gradients_bytes": trainable * trainable_params,
            "optimizer_bytes": moment_bytes(precision, optimizer, trains_all) * trainable_params}


def activation_bytes_per_layer(arch: Arch, batch: int, seq: int, precision: str, fused_attention: bool,
                               lora: bool = False) -> float:
    """Bytes autograd keeps per transformer layer (see the module docstring for the coefficients)."""
    fp32 = precision == "fp32"  # else 16-bit autocast
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
                            optimizer: str, impl: str, precision: str = "fp32") -> float:
    """Temporaries of one AdamW step (see the module docstring), in the moments' dtype: 0 fused or 8-bit; one per
    trainable parameter foreach (4 bytes in fp32); two of the largest trainable tensor single-tensor."""
    if impl not in OPTIMIZER_IMPLS:
        raise ValueError(f"optimizer implementation {impl}: choose one of {OPTIMIZER_IMPLS}")
    fixed = OPTIMIZERS[optimizer]
    if impl == "fused" or fixed is not None and fixed < 8:  # fused and 8-bit AdamW update in place
        return 0.0
    state = moment_bytes(precision, optimizer, method == "full") / 2  # bytes per element of one moment
    if impl == "foreach":
        return state * trainable
    if method == "full":
        return 2 * state * arch.largest_param
    lora = [rank * max(i, o) for i, o in lora_targets(arch, targets)]
    # a causal LM's LM head is frozen under LoRA (no task head trains); a classifier's head trains
    head = [] if arch.causal_lm else [i * o for n, (i, o, _) in arch.linears.items() if _is_head(n)]
    return 2 * state * max(lora + head + [0])


@dataclass
class Setting:
    method: str
    rank: int = 8
    targets: tuple[str, ...] = ("query", "value")
    batch: int = 32
    seq: int = 128
    precision: str = "bf16"
    optimizer: str = "adamw"
    optimizer_impl: str = "fused"
    fused_attention: bool = True
    grad_checkpointing: bool = False
    double_quant: bool = True
    trainable: int | None = None  # a method's own trainable count (record_setting); None: counted for the method
    strategy: str = "none"  # none | ddp | fsdp: what each of `gpus` GPUs holds (batch: each GPU's micro-batch)
    gpus: int = 1
    reshard_after_forward: bool = True  # fsdp: free each block's gathered parameters after its forward (ZeRO-3)
    gradient_as_bucket_view: bool = False  # ddp: gradients as views into the buckets (no second copy)


def check_distribution(s: Setting) -> None:
    """One-line refusals for a strategy and GPU count that mean nothing."""
    if s.strategy not in STRATEGIES:
        raise ValueError(f"strategy '{s.strategy}': choose one of {', '.join(STRATEGIES)}")
    if isinstance(s.gpus, bool) or not isinstance(s.gpus, int) or s.gpus < 1:
        raise ValueError(f"gpus {s.gpus!r}: the number of GPUs is a whole number, at least 1")
    if s.strategy == "none" and s.gpus != 1:
        raise ValueError(f"strategy none is one process on one GPU; {s.gpus} GPUs need ddp or fsdp")


def fsdp_unit_bytes(arch: Arch, s: Setting, trainable: float) -> dict[str, float]:
    """FSDP2's shard units unsharded (bytes): one transformer block and the root (embeddings, final norm, heads), each
    parameter in the dtype it is stored in, and the gradients of their trainable parameters. Adapters (trainable
    parameters other than the task head) are spread evenly over the blocks."""
    layers = max(arch.layers, 1)
    block = float(arch.block_params)
    root = arch.params - arch.layers * block  # no block found: everything is the root
    if s.method == "full":
        _, per, _ = weight_bytes(s.precision, True)
        return {"block": per * block, "root": per * root, "block_grads": per * block, "root_grads": per * root}
    adapters = max(trainable - arch.head_params, 0) / layers
    if s.method == "qlora":  # packed 4-bit linear weights; the rest and the adapters fp32
        linear = arch.layer_linear_params / layers if block else 0.0
        frozen_block, frozen_root, per = NF4_BYTES * linear + 4.0 * (block - linear), 4.0 * root, 4.0
    else:
        frozen, per, _ = weight_bytes(s.precision, False)
        frozen_block, frozen_root = frozen * block, frozen * (root - arch.head_params) + per * arch.head_params
    return {"block": frozen_block + per * adapters, "root": frozen_root, "block_grads": per * adapters,
            "root_grads": per * arch.head_params}


def distribute(arch: Arch, s: Setting, out: dict[str, float]) -> dict[str, float]:
    """One process's components -> what each of `s.gpus` GPUs holds under `s.strategy` (module docstring)."""
    out.update(gpus=float(s.gpus), ddp_buckets_bytes=0.0, fsdp_gathered_params_bytes=0.0,
               fsdp_unsharded_grads_bytes=0.0)
    if s.strategy == "ddp" and not s.gradient_as_bucket_view:  # one more copy of the trainable gradients
        out["ddp_buckets_bytes"] = out["gradients_bytes"]
    elif s.strategy == "fsdp":
        n = s.gpus
        # QLoRA's quantisation constants are module state, not parameters: every GPU holds them whole
        whole = arch.quantisable_params * QUANT_CONST_BYTES[s.double_quant] if s.method == "qlora" else 0.0
        out["weights_bytes"] = (out["weights_bytes"] - whole) / n + whole
        for key in ("master_weights_bytes", "gradients_bytes", "optimizer_bytes", "optimizer_step_working_bytes"):
            out[key] /= n
        units = fsdp_unit_bytes(arch, s, out["trainable_params"])
        gathered = min(FSDP_UNITS_IN_FLIGHT, arch.layers) if s.reshard_after_forward else arch.layers
        out["fsdp_gathered_params_bytes"] = units["root"] + gathered * units["block"]
        out["fsdp_unsharded_grads_bytes"] = units["root_grads"] + units["block_grads"]
    return out


def estimate(arch: Arch, s: Setting) -> dict[str, float]:
    """Memory components and the estimated peak (bytes) for one method on one model, per GPU under `s.strategy`."""
    if s.method not in METHODS:
        raise ValueError(f"method {s.method}: choose one of {METHODS}")
    check_distribution(s)
    if s.method == "full":
        trainable = arch.params
    elif s.trainable is not None:
        trainable = s.trainable
    else:
        trainable = lora_trainable(arch, s.rank, s.targets) + arch.head_params
    if s.precision not in PRECISIONS:
        raise ValueError(f"precision {s.precision}: choose one of {PRECISIONS}")
    out: dict[str, float] = {"total_params": float(arch.params), "trainable_params": float(trainable)}
    full = s.method == "full"
    # the frozen base: every parameter but the task head (which trains), none for full fine-tuning
    frozen = 0.0 if full else float(arch.params - arch.head_params)
    if s.method == "qlora":
        quantised = arch.quantisable_params
        rest = arch.params - arch.head_params - quantised
        # peft's prepare_model_for_kbit_training holds everything it does not quantise in fp32, whatever the precision
        out["weights_bytes"] = quantised * (NF4_BYTES + QUANT_CONST_BYTES[s.double_quant]) + 4 * (rest + trainable)
        out["master_weights_bytes"] = 0.0
        out["gradients_bytes"] = 4.0 * trainable
        out["optimizer_bytes"] = moment_bytes("fp32", s.optimizer, False) * trainable
        # one layer's weights dequantised to 16 bits at a time (forward and backward)
        copies = 2.0 * arch.layer_linear_params / max(arch.layers, 1)
    else:
        out.update(training_state_bytes(frozen + trainable, trainable, s.precision, s.optimizer, trains_all=full))
        if s.precision in AUTOCAST_OVER_FP32:  # every linear weight of the layers, cast per use and kept
            copies = 2.0 * arch.layer_linear_params
        elif s.precision == "bf16" and not full:  # the frozen weights are bf16 already: only the fp32 trainable ones
            copies = 2.0 * trainable
        else:
            copies = 0.0
        if s.grad_checkpointing:  # kept only for the layer being recomputed
            copies /= max(arch.layers, 1)
    precision = "bf16-mixed" if s.method == "qlora" else s.precision
    per_layer = activation_bytes_per_layer(arch, s.batch, s.seq, precision, s.fused_attention, not full)
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
    out["optimizer_step_working_bytes"] = optimizer_working_bytes(
        arch, s.method, s.rank, s.targets, trainable, s.optimizer, s.optimizer_impl,
        "fp32" if s.method == "qlora" else s.precision)
    if s.trainable is not None:  # a method's own tensors, shapes unknown here: at most 8 bytes per trainable one
        out["optimizer_step_working_bytes"] = min(out["optimizer_step_working_bytes"], 8.0 * trainable)
    distribute(arch, s, out)
    fixed = out["weights_bytes"] + out["master_weights_bytes"] + out["optimizer_bytes"] + out["ddp_buckets_bytes"]
    unsharded = out["fsdp_gathered_params_bytes"] + out["fsdp_unsharded_grads_bytes"]
    backward = unsharded + max(out["activations_bytes"] + copies, out["gradients_bytes"]) \
        + out["backward_working_bytes"]
    out["peak_bytes"] = fixed + max(backward, out["gradients_bytes"] + out["optimizer_step_working_bytes"])
    out["sum_of_parts_bytes"] = fixed + unsharded + out["gradients_bytes"] + out["activations_bytes"] + copies
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
    dist = eff.get("distributed") or {}  # a run over several processes: what each GPU held, its share of the batch
    gpus = int(dist.get("world_size", 1))
    if dist:
        modelled_as += f", {dist['strategy']} over {gpus} GPUs"
    st = Setting(method=method if method in METHODS else "lora", rank=rec.get("rank") or 8,
                 targets=tuple(method_cfg.get("target_modules") or ()), batch=int(eff["budget"]["batch_size"]) // gpus,
                 strategy=str(dist.get("strategy", "none")), gpus=gpus,
                 reshard_after_forward=bool(dist.get("reshard_after_forward", True)),
                 seq=seq, precision=record_precision(eff),
                 fused_attention=device_type == "cuda",
                 # bench.train: fused AdamW on CUDA, torch's default (single-tensor) elsewhere
                 optimizer_impl="fused" if device_type == "cuda" else "single_tensor",
                 grad_checkpointing=bool(method_cfg.get("gradient_checkpointing", False)),
                 double_quant=bool(method_cfg.get("double_quant", True)), trainable=trainable)
    return st, modelled_as


def record_precision(eff: dict) -> str:
    """The estimator's precision for a run's effective config: its own mode; `bf16` / `fp16` without a
    `weight_dtype` is a run from before the weights' dtype followed the precision (autocast over fp32 weights)."""
    precision = str(eff.get("precision") or "fp32")
    if precision in ("bf16", "fp16") and "weight_dtype" not in eff:
        return f"{precision}-mixed"
    return precision


def record_estimate(rec: dict) -> dict[str, Any]:
    """Estimate vs measured training peak for one ok record, on CUDA only (measured: memory.train's
    peak_allocated_bytes; for a distributed run, its largest rank's peak, against the estimate per GPU under its
    strategy). A CPU record's peak RSS is given as `measured_rss_bytes`, not compared: it holds the Python process,
    the data and the allocator's free lists too. Methods other than full/lora/qlora: `record_setting`."""
    mem = (rec.get("memory") or {}).get("train") or {}
    eff = rec["effective_config"]
    arch = arch_from_model_conf(eff["model"], num_labels=record_num_labels(rec))
    st, modelled_as = record_setting(rec)
    est = estimate(arch, st)
    row = {"run_id": rec["run_id"], "method": rec["method"], "precision": st.precision, "params": arch.params,
           "batch": st.batch,
           "seq": st.seq, "estimate_bytes": est["peak_bytes"], "kind": mem.get("kind"), "modelled_as": modelled_as,
           "causal_lm": arch.causal_lm, "parts": est}
    if mem.get("kind") == "cuda":
        # a distributed run: the largest rank's peak (the record's train phase is rank 0's alone)
        row["measured_bytes"] = (rec.get("distributed") or {}).get("max_rank_peak_memory_bytes") \
            or mem["peak_allocated_bytes"]
        row["estimate_over_measured_ratio"] = est["peak_bytes"] / row["measured_bytes"]
    elif mem.get("peak_rss_bytes"):
        row["measured_rss_bytes"] = mem["peak_rss_bytes"]
    return row
