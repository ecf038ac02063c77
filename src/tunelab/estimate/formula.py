"""The memory model: peak bytes of a training run, term by term.

Notation (all per micro-batch unless said otherwise): ``h`` hidden size, ``i`` MLP size,
``q`` = heads x head_dim, ``kv`` = key/value heads x head_dim, ``V`` vocabulary, ``L_g``
decoder layers on the gradient path (layers at or above the first one with anything
trainable below or in it; all layers for prompt learning, embeddings training, or
gradient checkpointing), ``P`` positions the model computes (rows x width, padding
included; packed rows are the batch's examples back to back), ``S`` supervised
positions, ``b`` bytes of an activation (2 under bf16/fp16 autocast, else the weight
dtype), ``b_r`` bytes of the residual stream (the float weights' dtype: 4 on CPU, where
weights stay fp32 under autocast).

Terms (peak = the largest of the phase totals below):

- ``framework`` (CPU only): resident bytes of Python + torch + transformers + PEFT +
  accelerate after import, measured once per environment in a fresh subprocess
  (:mod:`tunelab.estimate.baseline`), plus a calibrated ``runtime`` constant for the
  tokenizer and what the trainer builds before the first step.
- ``dataset``: tokenized examples as Python lists, 72 bytes per token.
- ``weights``: every stored parameter once (tied embeddings once), by storage kind:
  float dtypes at their size; NF4 0.5 byte/weight + absmax per 64-weight block (4 bytes,
  or 1 byte + 4 bytes per 256 blocks with double quantisation); int8 1 byte/weight + a
  fp32 scale per row. Quantization covers base linear weights except the LM head.
- ``autocast_copies``: under mixed precision with fp32 weights (CPU), every linear layer
  casts its weight to bf16 and the copy is saved for backward: 2 bytes x frozen linear
  weights of the ``L_g`` layers (one layer with checkpointing), plus 2 bytes x trainable
  linear weights (autocast caches casts of trainable leaves until the forward ends).
- ``gradients``: trainable parameters x their dtype (present during the forward pass
  only with gradient accumulation; always at the optimizer step). ZeRO-2/3 divide by N.
- ``optimizer``: AdamW 2 states in the parameter dtype (8 bytes/param for fp32); 8-bit
  AdamW 2 bytes/param (tensors under 4096 elements stay 32-bit); SGD momentum 1 state.
  Created at the first step, so live in every later forward. ZeRO-1+ divide by N.
- ``activations``: per layer on the gradient path, bytes per position::

      a = 2h*4                      the two RMSNorms' fp32 inputs (they compute in fp32
                                    whatever the model's dtype, so a bf16 residual is upcast)
        + (2q + 2kv')*b             attention: rotated queries, output, keys, values
        + 3i*b                      MLP: gate output, its SiLU, up output
        + sum(inputs of trainable linears)*b   (LoRA A/B, full/freeze weights, adapters;
                                    under autocast each linear casts its own copy, so
                                    q/k/v/gate/up each count; in fp32 they share one)
        + trainable norm weights*b_r + IA3: scaled outputs*b + scaled FFN inputs*4
        + DoRA: 2 x output features of each adapted layer*b (base and LoRA outputs,
          both rescaled by the trained magnitude)

  ``kv' = q`` when an attention mask is materialised (SDPA then repeats grouped
  key/value heads) else ``kv``; for SmolLM2 with LoRA on all linears under CPU bf16
  autocast this is (8h + 2kv + 4i)*2 + 2h*4 + 14r. Total ``L_g x P x a``. With gradient
  checkpointing only each layer's input is kept: ``L_g x P x h x b_r``.
  A materialised mask (several packed sequences, or a prefix) adds
  ``rows x width x (width + prefix) x b`` per layer (SDPA converts it per call).
  Prefix tuning adds its key/value prefix to every layer: ``2 x prefix x kv' x b x rows``.
- ``logits``: the LM head runs on the ``S`` supervised rows, a chunk of ``c`` rows at a
  time (``train.loss_chunk_size``; all ``S`` at once when 0 or ``S <= c``): bf16 logits,
  their fp32 copy, the fp32 log-softmax and its gradient, ``min(c, S) x V x k_loss``
  bytes (calibrated ``k_loss``), plus the head's bf16 weight copy under CPU autocast.
- ``backward``: the transient gradients of one layer while backward walks down, plus
  the recomputed layer under checkpointing: ``k_bwd x P x a`` (calibrated).
- ``allocator`` (CPU): glibc keeps freed activation blocks in its heap for reuse, so
  resident memory exceeds the live tensors of a step by a calibrated fraction
  ``k_alloc - 1`` of its saved activations (the many tensors of changing sizes; the
  LM-head chunks have one size and reuse their blocks). By default the trainer
  leaves glibc's default (dynamic) mmap threshold in place: fixing it low returned every
  large block to the OS but made each new tensor fault its pages in again: 245 against 383
  tokens/s on the speed job (``benchmarks/speed.py`` variant ``tunelab_mmap128k``). With
  ``train.compact_heap`` (on under a memory budget) resident memory follows the live
  tensors: such runs get :data:`COMPACT_HEAP_CALIBRATION`, whose heap terms are fitted on
  compact-heap runs. On CUDA
  the estimate is
  ``torch.cuda.max_memory_allocated`` (live tensors); the CUDA context (~0.5 GiB) is
  outside it.

- ``weight_reorders`` (CPU, frozen base held in bf16): oneDNN multiplies bf16 weights in
  its own blocked layout and keeps the reordered copies; a calibrated ``k_reorder`` x the
  bytes of the frozen linear weights.

- ``quantization_slack`` (CPU, quantized base): the load converts each weight and
  quantizes it; glibc keeps the freed conversion buffers resident, a calibrated
  ``k_quant`` x the quantized weights' bytes in their loading dtype, for the whole run
  (load phase included). The LoRA layers of a quantized base run PEFT's own forward (the
  fused one covers float linears only), which on CPU casts each layer's input to fp32
  (its autocast check looks at CUDA) and autocast casts it back: every layer saves its
  own copy (no sharing between q/k/v or gate/up) and the transient copies add a
  calibrated ``k_unfused`` x saved activations to the allocator slack. Measured on QLoRA
  before these terms: -20% and -26%.

- ``kernel_cache`` (CPU, bf16 autocast): oneDNN JIT-compiles bf16 kernels for every new
  matmul shape and keeps them (up to 1024 primitives). Every micro-batch of a new
  (rows, width) creates new ones, so resident memory creeps up over a run by a calibrated
  ``k_cache`` per distinct shape seen so far (capped at ~50 shapes). fp32 runs use MKL and
  do not grow (measured: +0.06 GB over a 50-step fp32 run against +0.5 GB in bf16).

Phases: ``model load`` (CPU) = framework + weights + the checkpoint files, which are
memory-mapped while the weights are converted to the training dtype (for a small run on a
bf16 base loaded from fp32 files this is the peak); ``forward`` = framework + dataset +
weights + optimizer (+ gradients with accumulation) + autocast copies + activations +
max(logits, backward) + allocator + weight reorders (+ a frozen ``reference_model`` copy
of the weights for full/freeze DPO and KTO);
``optimizer step`` = framework + dataset + weights + gradients + optimizer + AdamW's
temporaries (2 x the largest trainable tensor). With N GPUs and ZeRO stage s: stage
>= 1 shards optimizer states, >= 2 gradients, 3 the weights (``weights`` / N, plus
``gathered_layers``: two full decoder layers being computed and prefetched).

Calibration (``Calibration`` defaults): fitted with ``benchmarks/estimator_grid.py`` on
SmolLM2-135M over methods x length x batch x checkpointing; see
benchmarks/results/estimator_grid.md for the errors. A run on the compact C heap
(``train.compact_heap``) gets :data:`COMPACT_HEAP_CALIBRATION`, the same constants but for the
heap's leftovers, fitted with ``--heap compact`` (benchmarks/results/estimator_grid-compact.md).
"""

from __future__ import annotations

from dataclasses import dataclass

from tunelab.estimate.skeleton import ModelFacts
from tunelab.estimate.workload import MicroBatch, Workload

#: bitsandbytes keeps tensors below this many elements in 32-bit even in 8-bit optimizers.
BNB_MIN_8BIT_SIZE = 4096
#: oneDNN keeps at most 1024 primitives (ONEDNN_PRIMITIVE_CACHE_CAPACITY); a Llama training
#: step creates roughly 20 new ones (7 projections x forward, input and weight gradients)
#: per new batch shape, so the cache stops growing after about 50 shapes.
ONEDNN_CACHE_SHAPES = 50
#: Llama-style RMSNorms upcast their input to fp32 and keep that copy for backward.
NORM_BYTES = 4


@dataclass(frozen=True)
class Calibration:
    """Constants fitted with ``benchmarks/estimator_grid.py --fit`` (2-core x86 CPU with AMX,
    torch 2.13, transformers 5.23, frozen bases held in bf16; the two quantization constants
    on the QLoRA grid runs, bitsandbytes 0.50 without its CPU kernels package). The four of
    glibc's heap (``kernel_cache_bytes_per_shape``, ``allocator_factor``,
    ``quantization_slack_factor``, ``unfused_allocator_extra``) were fitted again with ``--fit
    heap`` on a 2-core AMD EPYC without AMX, whose runs the grid's tables now measure (the
    24-step runs' many micro-batch widths had been over-predicted by 24% and 42%): errors in
    benchmarks/results/estimator_grid.md."""

    #: bytes per logit of one LM-head chunk at its peak (bf16 logits, fp32 copy,
    #: log-softmax, their gradients)
    loss_bytes_per_logit: float = 14.0
    #: backward transient, in layers' worth of saved activations
    backward_layers: float = 0.5
    #: tokenizer, accelerator, method objects and the like beyond the import baseline
    runtime_bytes: int = 40 * 2**20
    #: CPU bf16: resident bytes oneDNN's kernel cache adds per new micro-batch shape
    kernel_cache_bytes_per_shape: float = 40 * 2**20
    #: CPU: resident bytes per byte of saved activations (glibc heap slack)
    allocator_factor: float = 1.3
    #: CPU: share of the memory-mapped checkpoint files resident at the model-load peak
    weight_file_fraction: float = 0.9
    #: CPU, 16-bit frozen weights: oneDNN's reordered (blocked) copies of them, per weight byte
    weight_reorder_factor: float = 0.75
    #: CPU, quantized base: heap left resident by quantizing at load, per byte of the weights
    #: in their loading dtype
    quantization_slack_factor: float = 1.25
    #: CPU, LoRA layers run by PEFT's own forward on a quantized base: extra heap slack per byte
    #: of saved activations (each layer makes a transient fp32 copy of its input, because
    #: PEFT's autocast check looks at CUDA only, and autocast casts it back to bf16)
    unfused_allocator_extra: float = 0.1


#: The calibration of a CPU run under ``train.compact_heap`` (:mod:`tunelab.heap`): glibc gives
#: every freed block of 1 MiB or more back to the system, so the heap keeps little beyond the
#: live tensors. Only the terms that model glibc's leftovers differ from ``Calibration()``'s
#: (``allocator_factor``, ``kernel_cache_bytes_per_shape``, ``quantization_slack_factor``,
#: ``unfused_allocator_extra``); fitted with ``benchmarks/estimator_grid.py --heap compact --fit``
#: (benchmarks/results/estimator_grid-compact.md).
COMPACT_HEAP_CALIBRATION = Calibration(kernel_cache_bytes_per_shape=30 * 2**20, allocator_factor=0.95,
                                       quantization_slack_factor=0.75, unfused_allocator_extra=0.0)


def default_calibration(compact_heap: bool) -> Calibration:
    """The fitted constants for a run on glibc's default heap or on the compact heap."""
    return COMPACT_HEAP_CALIBRATION if compact_heap else Calibration()


@dataclass(frozen=True)
class Precision:
    """Byte sizes that follow from the device, weight dtype and mixed precision."""

    activation: int       # b
    residual: int         # b_r
    autocast_copies: bool  # fp32 weights computed in 16 bits: each linear makes a 16-bit weight copy


@dataclass(frozen=True)
class Target:
    """Where the run trains."""

    device: str                    # "cpu" or "cuda"
    capacity_bytes: int | None     # memory of one device, when known
    num_gpus: int = 1
    zero_stage: int = 0


@dataclass
class Breakdown:
    """Peak bytes by term; ``phase`` names the moment of the peak."""

    terms: dict[str, float]
    phase: str
    batch: MicroBatch

    @property
    def total(self) -> int:
        return int(round(sum(self.terms.values())))


def layer_bytes_per_position(facts: ModelFacts, layer: int, precision: Precision, masked: bool) -> float:
    """``a``: bytes one decoder layer keeps for backward per computed position."""
    b, b_r = precision.activation, precision.residual
    kv = facts.q_dim if masked else facts.kv_dim
    total = 2 * facts.hidden * NORM_BYTES + (2 * facts.q_dim + 2 * kv) * b + 3 * facts.intermediate * b
    saved = facts.saved_inputs[layer]
    if b != b_r or not facts.shared_linear_inputs:  # each linear casts its input to b bytes itself
        total += sum(s.features for s in saved) * b
    else:
        total += sum({(s.group, s.features): s.features for s in saved}.values()) * b
    total += facts.trainable_norms[layer] * b_r
    total += facts.ia3_outputs[layer] * b + facts.ia3_inputs[layer] * 4
    total += 2 * facts.dora_outputs[layer] * b
    return total


def grad_layers(facts: ModelFacts, checkpointing: bool) -> range:
    """Decoder layers that keep activations (checkpointing feeds gradients through all)."""
    return range(0 if checkpointing else facts.first_grad_layer, facts.layers)


def activation_bytes(facts: ModelFacts, batch: MicroBatch, precision: Precision, packed: bool,
                     checkpointing: bool) -> tuple[float, float]:
    """(saved activation bytes of the whole forward, largest single layer's saved bytes)."""
    layers = grad_layers(facts, checkpointing)
    if not layers:
        return 0.0, 0.0
    width = batch.width + facts.virtual_tokens
    positions = batch.rows * width
    masked = batch.masked(packed) or facts.prefix_tokens > 0
    mask = batch.rows * width * (width + facts.prefix_tokens) * precision.activation if masked else 0
    prefix = 2 * facts.prefix_tokens * (facts.q_dim if masked else facts.kv_dim) * precision.activation * batch.rows
    per_layer = [positions * layer_bytes_per_position(facts, i, precision, masked) + mask + prefix for i in layers]
    largest = max(per_layer)
    if checkpointing:
        return len(layers) * positions * facts.hidden * precision.residual, largest
    return sum(per_layer), largest


def logits_bytes(facts: ModelFacts, batch: MicroBatch, chunk: int, precision: Precision,
                 calibration: Calibration) -> float:
    """Peak of the chunked LM head + cross-entropy (one chunk of rows at a time)."""
    rows = min(chunk, batch.supervised) if chunk > 0 else batch.supervised
    head_copy = facts.vocab * facts.hidden * 2 if precision.autocast_copies else 0
    return rows * facts.vocab * calibration.loss_bytes_per_logit + head_copy


def autocast_copy_bytes(facts: ModelFacts, precision: Precision, checkpointing: bool) -> int:
    """16-bit weight copies alive at the end of the forward pass (fp32 weights under autocast)."""
    if not precision.autocast_copies:
        return 0
    layers = grad_layers(facts, checkpointing)
    frozen = [facts.frozen_linear_weights[i] for i in layers]
    kept = (max(frozen, default=0) if checkpointing else sum(frozen))
    return 2 * (kept + facts.trainable_linear_weights)


def optimizer_bytes(facts: ModelFacts, optimizer: str) -> int:
    """Optimizer state bytes for the trainable parameters."""
    if optimizer == "sgd":
        return facts.trainable_bytes
    if optimizer in ("adamw_8bit", "paged_adamw_8bit"):
        return sum(2 * n if n >= BNB_MIN_8BIT_SIZE else 8 * n for n in facts.trainable_tensors)
    if optimizer == "paged_adamw_32bit":
        return 8 * facts.trainable_params
    return 2 * facts.trainable_bytes


def _shard(value: float, target: Target, stage: int) -> float:
    """ZeRO: the term is split across the GPUs from ``stage`` on."""
    return value / target.num_gpus if target.zero_stage >= stage and target.num_gpus > 1 else value


def weight_terms(facts: ModelFacts, target: Target) -> dict[str, float]:
    """Weights per device. ZeRO-3 keeps 1/N of them plus two gathered decoder layers (the
    one computing and the one being prefetched)."""
    weights = sum(facts.weight_bytes.values())
    if target.zero_stage >= 3 and target.num_gpus > 1:
        return {"weights": weights / target.num_gpus, "gathered_layers": 2 * facts.layer_weight_bytes}
    return {"weights": weights}


@dataclass(frozen=True)
class Settings:
    """The run settings the formula reads, resolved for the target."""

    precision: Precision
    target: Target
    optimizer: str
    checkpointing: bool
    chunk: int
    grad_accum: int
    framework: int
    calibration: Calibration
    reference_copy: bool = False  # full/freeze DPO and KTO keep a frozen copy of the starting model
    weight_file_bytes: int = 0  # checkpoint files converted while the model loads (CPU)


def _fixed_terms(facts: ModelFacts, workload: Workload, run: Settings) -> dict[str, float]:
    """What is resident for the whole run: framework, data, weights."""
    cpu = run.target.device == "cpu"
    fixed = {"framework": run.framework + run.calibration.runtime_bytes if cpu else 0,
             "dataset": workload.dataset_bytes if cpu else 0,
             **weight_terms(facts, run.target), "quantization_slack": quantization_slack(facts, run)}
    if run.reference_copy:
        fixed["reference_model"] = fixed["weights"]
    return fixed


def quantization_slack(facts: ModelFacts, run: Settings) -> float:
    """CPU: the load converts each weight to its loading dtype and quantizes it; glibc keeps
    the freed conversion buffers in its heap (they are too large for its small-block bins
    and, once its mmap threshold has risen past their size, not returned to the OS), so
    the resident set stays above the quantized weights for the whole run."""
    return run.calibration.quantization_slack_factor * facts.quantized_float_bytes if run.target.device == "cpu" else 0


def forward_terms(facts: ModelFacts, workload: Workload, batch: MicroBatch, run: Settings,
                  with_states: bool, with_grads: bool) -> dict[str, float]:
    """The end of the forward pass / start of backward: every activation is alive.

    ``with_states``: the optimizer has stepped before (its states exist);
    ``with_grads``: earlier micro-batches of this step left their gradients.
    """
    cal = run.calibration
    saved, largest = activation_bytes(facts, batch, run.precision, workload.packed, run.checkpointing)
    copies = autocast_copy_bytes(facts, run.precision, run.checkpointing)
    logits = logits_bytes(facts, batch, run.chunk, run.precision, cal)
    backward = cal.backward_layers * largest * (2 if run.checkpointing else 1)
    extra = 0.0 if facts.shared_linear_inputs else cal.unfused_allocator_extra
    slack = (cal.allocator_factor - 1 + extra) * saved if run.target.device == "cpu" else 0
    reorders = (cal.weight_reorder_factor * 2 * sum(facts.frozen_linear_weights)
                if _onednn_bf16_weights(run) and not facts.quantized_float_bytes else 0)
    return {**_fixed_terms(facts, workload, run),
            "optimizer": _shard(optimizer_bytes(facts, run.optimizer), run.target, 1) if with_states else 0,
            "gradients": _shard(facts.trainable_bytes, run.target, 2) if with_grads else 0,
            "autocast_copies": copies, "activations": saved,
            "logits": logits if logits >= backward else 0, "backward": backward if backward > logits else 0,
            "allocator": slack, "weight_reorders": reorders}


def _onednn_bf16_weights(run: Settings) -> bool:
    """CPU runs whose frozen weights are stored in 16 bits and multiplied by oneDNN in bf16."""
    return run.target.device == "cpu" and run.precision.activation == 2 and run.precision.residual == 2


def step_terms(facts: ModelFacts, workload: Workload, run: Settings) -> dict[str, float]:
    """The optimizer step: gradients and states side by side, plus AdamW's per-tensor temporaries."""
    return {**_fixed_terms(facts, workload, run),
            "optimizer": _shard(optimizer_bytes(facts, run.optimizer), run.target, 1),
            "gradients": _shard(facts.trainable_bytes, run.target, 2),
            "optimizer_temporaries": 2 * max(facts.trainable_tensors, default=0) * 4}


def kernel_cache_bytes(shapes: int, run: Settings) -> float:
    """oneDNN's cache of bf16 kernels: every new micro-batch shape JIT-compiles and keeps new ones.

    Only CPU runs in 16-bit autocast go through oneDNN's bf16 primitives (fp32 matmuls use
    MKL); the cache holds at most ``ONEDNN_CACHE_CAPACITY`` primitives (oneDNN's default),
    about ``ONEDNN_CACHE_SHAPES`` micro-batch shapes' worth.
    """
    if run.target.device != "cpu" or run.precision.activation != 2:
        return 0.0
    return min(shapes, ONEDNN_CACHE_SHAPES) * run.calibration.kernel_cache_bytes_per_shape


def peak_breakdown(facts: ModelFacts, workload: Workload, run: Settings) -> Breakdown:
    """The largest phase over the run's micro-batches, in the order the loop runs them.

    Optimizer states exist from the second optimizer step on, so a long first batch and
    the states are never resident together; gradients are alive during a forward pass
    only behind an earlier micro-batch of the same step (accumulation); the kernel cache
    grows with every micro-batch shape seen so far.
    """
    forward: dict[tuple[MicroBatch, bool, bool], dict[str, float]] = {}
    shapes: set[tuple[int, int]] = set()
    best: Breakdown | None = None
    for index, batch in enumerate(workload.batches):
        shapes.add((batch.rows, batch.width))
        key = (batch, index >= run.grad_accum, index % run.grad_accum > 0)
        if key not in forward:
            forward[key] = forward_terms(facts, workload, batch, run, *key[1:])
        terms = {**forward[key], "kernel_cache": kernel_cache_bytes(len(shapes), run)}
        if best is None or sum(terms.values()) > best.total:
            best = Breakdown(terms, "forward", batch)
    step = {**step_terms(facts, workload, run), "kernel_cache": kernel_cache_bytes(len(shapes), run)}
    if best is None or sum(step.values()) > best.total:
        best = Breakdown(step, "optimizer step", max(workload.batches, key=lambda b: b.positions))
    if run.target.device == "cpu":
        loading = {"framework": run.framework, **weight_terms(facts, run.target),
                   "quantization_slack": quantization_slack(facts, run),
                   "weight_files": run.weight_file_bytes * run.calibration.weight_file_fraction}
        if sum(loading.values()) > best.total:
            best = Breakdown(loading, "model load", best.batch)
    return Breakdown({k: int(round(v)) for k, v in best.terms.items()}, best.phase, best.batch)
