"""The LoRA family through PEFT: LoRA, DoRA, rsLoRA, PiSSA, LoRA+, QLoRA, AdaLoRA, IA3.

All of them add a small number of weights next to frozen base matrices, so they share
one implementation (:class:`Lora`) and differ in a few switches:

- ``dora``    decomposes each update into magnitude and direction (``use_dora``);
- ``rslora``  scales updates by alpha / sqrt(r) instead of alpha / r (``use_rslora``),
  which keeps high ranks from learning slower;
- ``pissa``   starts A and B from the top-r singular triplets of each weight and trains
  them against the residual weight; the saved adapter is converted back to a plain LoRA
  relative to the *original* base (see :class:`Lora` "mutating initialisations");
- ``loraplus`` gives the B matrices a larger learning rate (lr x ``loraplus_lr_ratio``,
  16 by default), which the LoRA+ paper shows speeds up and improves feature learning;
- ``qlora``   trains LoRA on a 4-bit base that the loader has already quantised;
- ``adalora`` parameterises updates as P diag(E) Q and prunes singular values during
  training to move rank budget to the matrices that need it;
- ``ia3``     learns per-channel scaling vectors of keys, values and FFN inputs.
"""

from __future__ import annotations

import copy
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Literal, Union

import torch
from pydantic import Field
from torch import nn

from tunelab.config import MethodConfig
from tunelab.errors import ConfigError
from tunelab.methods.base import register
from tunelab.methods.peft_common import ADAPTER_NAME, PeftMethod

if TYPE_CHECKING:
    from peft import PeftConfig, PeftModel
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from tunelab.config import TrainConfig


class TargetModulesConfig(MethodConfig):
    """Adapters placed on named modules of the base (the LoRA family and IA3)."""

    target: Union[str, list[str]] = Field("all-linear", description="Modules that get an adapter: 'all-linear', "
                                                                    "a module name, or a list of names.")
    modules_to_save: list[str] = Field(default_factory=list, description="Modules trained in full and saved with "
                                                                         "the adapter (e.g. lm_head).")


class LoraFamilyConfig(TargetModulesConfig):
    """Low-rank updates scaled by alpha: LoRA and its variants, AdaLoRA."""

    alpha: float = Field(16.0, gt=0, description="Scale of the update: alpha / r (alpha / sqrt(r) with rsLoRA).")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the adapter's input.")


class LoraMethodConfig(LoraFamilyConfig):
    """LoRA, DoRA, rsLoRA, PiSSA, LoRA+ and QLoRA."""

    r: int = Field(8, gt=0, description="Rank of the update matrices.")
    use_dora: bool = Field(False, description="Decompose updates into magnitude and direction (DoRA).")
    use_rslora: bool = Field(False, description="Scale updates by alpha / sqrt(r) (rsLoRA).")
    init: Literal["default", "gaussian", "pissa", "olora"] = Field(
        "default", description="Initialisation of A and B; pissa and olora start from the base weights.")
    loraplus_lr_ratio: float | None = Field(None, gt=0, description="LoRA+: learning rate of B = lr x ratio.")


class AdaLoraMethodConfig(LoraFamilyConfig):
    """AdaLoRA's rank budget and its schedule (in optimizer steps)."""

    init_r: int = Field(12, gt=0, description="Rank every matrix starts with.")
    target_r: int = Field(8, gt=0, description="Average rank left after pruning.")
    tinit: int | None = Field(None, ge=0, description="Steps of full rank before pruning starts; null = 10% of "
                                                          "the run's optimizer steps.")
    tfinal: int | None = Field(None, ge=0, description="Steps at the final budget at the end of the run; null = "
                                                           "20% of the run's optimizer steps.")
    deltaT: int | None = Field(None, gt=0, description="Steps between two rank reallocations; null = a tenth of "
                                                           "the steps between tinit and tfinal (at least 1).")


class IA3MethodConfig(TargetModulesConfig):
    """(IA)^3's scaled modules."""

    feedforward_modules: list[str] | None = Field(None, description="Targets scaled on their input (the FFN "
                                                                    "ones); default: PEFT's choice per architecture.")

#: tunelab's ``method.init`` -> PEFT's ``init_lora_weights``. PiSSA uses the exact SVD:
#: it is deterministic, so a resumed run rebuilds the same residual base.
_LORA_INIT = {"default": True, "gaussian": "gaussian", "pissa": "pissa", "olora": "olora"}

#: Initialisations that move part of each base weight into A and B (W = W_res + s*B0*A0).
_MUTATING_INITS = {"pissa", "olora"}

#: LoRA+ ratio when ``method.type: loraplus`` leaves ``loraplus_lr_ratio`` unset (the paper's default).
LORAPLUS_DEFAULT_RATIO = 16.0

#: The attribute of a PeftModel that holds the adapter weights right after a mutating
#: initialisation; present only on models created that way in this process.
_INITIAL_ADAPTER_ATTR = "tunelab_initial_adapter"


def _targets(target: str | list[str]) -> str | list[str]:
    """``'all-linear'`` stays PEFT's keyword (every linear layer but the output head); a
    single module name becomes a one-item list so PEFT matches it as a name suffix, not a regex."""
    if isinstance(target, str):
        return target if target == "all-linear" else [target]
    return list(target)


class Lora(PeftMethod):
    """Plain LoRA; subclasses switch DoRA, rsLoRA, PiSSA or LoRA+ on.

    Mutating initialisations (PiSSA, OLoRA) train A and B against a *residual* base
    W_res = W - s*B0*A0. Right after creation the initial A0/B0 are kept on the model so
    that (a) :meth:`save` can write the update as a plain LoRA relative to the original W
    (rank 2r: [B, B0] x [A; -A0], PEFT's ``path_initial_model_for_weight_conversion``), and
    (b) :meth:`reference` can reproduce the original model by swapping A0/B0 in.
    """

    config_class = LoraMethodConfig
    cfg: LoraMethodConfig
    peft_type = "LORA"
    mergeable = True
    #: Forced switches of the registered subclasses (OR-ed with the config flags).
    use_dora: bool = False
    use_rslora: bool = False
    forced_init: str | None = None
    default_loraplus_ratio: float | None = None

    def apply(self, model: "PreTrainedModel", tokenizer: "PreTrainedTokenizerBase") -> nn.Module:
        """PEFT's adapter, with the fused training forward on its plain LoRA linears (see
        :mod:`tunelab.methods.lora_fused`)."""
        from tunelab.methods.lora_fused import fuse_lora_linears

        peft_model = super().apply(model, tokenizer)
        fuse_lora_linears(peft_model)
        return peft_model

    # -- configuration ----------------------------------------------------------------
    def init_name(self) -> str:
        """The effective ``method.init``; a method that forces one refuses a conflicting value."""
        if self.forced_init is None:
            return self.cfg.init
        if self.cfg.init not in ("default", self.forced_init):
            raise ConfigError(f"method.type '{self.cfg.type}' always uses init '{self.forced_init}', but method.init "
                              f"is '{self.cfg.init}'. Remove method.init, or use method.type: lora with "
                              f"init: {self.cfg.init}.")
        return self.forced_init

    def peft_config(self, model: "PreTrainedModel", tokenizer: "PreTrainedTokenizerBase") -> "PeftConfig":
        from peft import LoraConfig

        return LoraConfig(task_type="CAUSAL_LM", r=self.cfg.r, lora_alpha=self.cfg.alpha,
                          lora_dropout=self.cfg.dropout, target_modules=_targets(self.cfg.target),
                          modules_to_save=self.cfg.modules_to_save or None,
                          use_dora=self.cfg.use_dora or self.use_dora,
                          use_rslora=self.cfg.use_rslora or self.use_rslora,
                          init_lora_weights=_LORA_INIT[self.init_name()])

    def loraplus_ratio(self) -> float | None:
        """The LoRA+ learning-rate ratio of B over A, or None for one learning rate."""
        return self.cfg.loraplus_lr_ratio or self.default_loraplus_ratio

    def param_groups(self, model: nn.Module, train: "TrainConfig") -> list[dict[str, Any]]:
        """LoRA+: the B matrices learn ``ratio`` times faster than everything else."""
        ratio = self.loraplus_ratio()
        if ratio is None:
            return super().param_groups(model, train)
        fast, slow = [], []
        for name, param in model.named_parameters():
            if param.requires_grad:
                (fast if ".lora_B." in name or ".lora_embedding_B." in name else slow).append(param)
        groups = [{"params": slow, "lr": train.lr, "weight_decay": train.weight_decay},
                  {"params": fast, "lr": train.lr * ratio, "weight_decay": train.weight_decay}]
        return [group for group in groups if group["params"]]

    # -- mutating initialisations (PiSSA, OLoRA) ----------------------------------------
    def after_create(self, model: "PeftModel", base: "PreTrainedModel",
                     tokenizer: "PreTrainedTokenizerBase") -> None:
        if self.init_name() in _MUTATING_INITS:
            setattr(model, _INITIAL_ADAPTER_ATTR,
                    {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad})

    def write_adapter(self, model: nn.Module, directory: Path) -> None:
        """Mutated bases are written as a plain LoRA relative to the original base weights."""
        initial = getattr(model, _INITIAL_ADAPTER_ATTR, None)
        if initial is None:
            return super().write_adapter(model, directory)
        from peft import get_peft_model_state_dict
        from safetensors.torch import save_file

        with tempfile.TemporaryDirectory(prefix="tunelab-initial-adapter-") as scratch:
            # PEFT reads the initial adapter from <dir>/<name>/ and writes its config there itself.
            initial_dir = Path(scratch) / "initial"
            initial_dir.mkdir()
            weights = get_peft_model_state_dict(model, state_dict=initial, adapter_name=ADAPTER_NAME)
            save_file({k: v.contiguous() for k, v in weights.items()}, str(initial_dir / "adapter_model.safetensors"))
            model.save_pretrained(str(directory), path_initial_model_for_weight_conversion=str(initial_dir))

    @contextmanager
    def reference(self, model: nn.Module) -> Iterator[nn.Module]:
        """The untrained model. After a mutating init, switching the adapter off would leave
        only the residual base, so the initial A0/B0 are swapped in instead (no copy)."""
        initial = getattr(model, _INITIAL_ADAPTER_ATTR, None)
        if initial is None:
            with super().reference(model) as ref:
                yield ref
            return
        params = dict(model.named_parameters())
        trained = {name: params[name].data for name in initial}
        try:
            for name, value in initial.items():
                params[name].data = value
            yield model
        finally:
            for name, value in trained.items():
                params[name].data = value


@register("lora")
class PlainLora(Lora):
    """LoRA (Hu et al., 2021): W + (alpha/r) * B A with A, B trained."""


@register("dora")
class Dora(Lora):
    """DoRA (Liu et al., 2024): LoRA on the direction plus a trained magnitude vector."""

    use_dora = True


@register("rslora")
class RsLora(Lora):
    """rsLoRA (Kalajdzievski, 2023): scaling alpha / sqrt(r)."""

    use_rslora = True


@register("pissa")
class Pissa(Lora):
    """PiSSA (Meng et al., 2024): A, B from the principal singular triplets of W."""

    forced_init = "pissa"


@register("loraplus")
class LoraPlus(Lora):
    """LoRA+ (Hayou et al., 2024): lr of B = lr x ratio."""

    default_loraplus_ratio = LORAPLUS_DEFAULT_RATIO


def is_4bit(model: nn.Module) -> bool:
    """Whether transformers loaded ``model`` through bitsandbytes in 4 bits."""
    return bool(getattr(model, "is_loaded_in_4bit", False))


@register("qlora")
class QLora(Lora):
    """QLoRA (Dettmers et al., 2023): LoRA on a frozen NF4 base.

    Merging cannot add the update into 4-bit weights without re-quantising them (which
    would lose most of it), so :meth:`merge` dequantises the base into a float model
    first and merges there: each merged weight is ``dequant(NF4(W)) + s·B·A``, what the
    4-bit model computes in training (bitsandbytes dequantises and multiplies in float).
    It is not what the run computes once loaded for inference on every device: on CPUs
    with AVX512-BF16, bitsandbytes' inference kernel casts activations and block scales to
    bf16, so those logits differ from the merged model's by that kernel's rounding (README
    "Export parity" measures both). The merged model can be re-quantised or exported like
    any model.
    """

    def apply(self, model: "PreTrainedModel", tokenizer: "PreTrainedTokenizerBase") -> nn.Module:
        """The LoRA adapter on the 4-bit base, whose layers keep their training layout through
        the run's evaluations (:func:`keep_training_layout`)."""
        return keep_training_layout(super().apply(model, tokenizer))

    def prepare_base(self, model: "PreTrainedModel") -> "PreTrainedModel":
        """Check the base is 4-bit; upcast fp16 float parts (norms, embeddings) to fp32.

        PEFT's k-bit preparation upcasts every 16-bit float part, because fp16 norms and
        embeddings overflow. bf16 parts are kept: they are what a bf16-autocast run loads on
        purpose (``models.loader.training_dtype``), the norms compute in fp32 internally
        anyway, and upcasting them made the QLoRA run heavier than plain LoRA on a bf16 base
        (measured on the compare job: 1.56 GiB against LoRA's 1.28 GiB). Gradient
        checkpointing is left to the training loop (``train.gradient_checkpointing``).
        """
        from peft import prepare_model_for_kbit_training

        if not is_4bit(model):
            raise ConfigError("method.type 'qlora' trains LoRA on a 4-bit base, but the base model was loaded "
                              "unquantised. Set model.quantization: 4bit (with bitsandbytes installed), or use "
                              "method.type: lora for a float base.")
        if any(p.dtype == torch.float16 for p in model.parameters()):
            return prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        return model

    def merge(self, model: nn.Module) -> "PreTrainedModel":
        """Dequantise the base into a float model, re-attach the adapter there and merge it."""
        from peft import get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict

        config = copy.deepcopy(model.peft_config[ADAPTER_NAME])
        config.init_lora_weights = True  # the weights below replace the initialisation anyway
        config.inference_mode = True
        trained = get_peft_model_state_dict(model, adapter_name=ADAPTER_NAME)
        weights = {k: v.detach().clone() for k, v in trained.items()}
        base = model.unload()
        base.dequantize(dtype=_float_dtype(weights))
        base.__dict__.pop("is_loaded_in_4bit", None)  # transformers leaves this flag behind
        float_model = get_peft_model(base, config, adapter_name=ADAPTER_NAME)
        set_peft_model_state_dict(float_model, weights, adapter_name=ADAPTER_NAME)
        return float_model.merge_and_unload()


def keep_training_layout(model: nn.Module) -> nn.Module:
    """Keep every bitsandbytes 4-bit layer of ``model`` computing through its training path.

    On CPUs with AVX512-BF16, bitsandbytes (0.50) repacks a 4-bit layer's weight for a fused
    inference kernel on its first forward in eval mode, and keeps it repacked: every later
    forward, in training too, runs that kernel, which has no backward, so no gradient flows
    back through the base's 4-bit layers (torch warns once about backpropagating through
    ``gemv_4bit``). Any evaluation inside a run (``train.eval_base``, periodic evals, PPO and
    GRPO rollouts) triggered it, and LoRA then learned only through the residual stream.
    Switching the repacking off costs speed in those evaluations only; a run loaded for
    inference (``load``) keeps the kernel.
    """
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    return model


def _float_dtype(weights: dict[str, torch.Tensor]) -> torch.dtype:
    """The dtype the adapter was trained in: the merged model keeps it."""
    return next(iter(weights.values())).dtype


@register("adalora")
class AdaLora(PeftMethod):
    """AdaLoRA (Zhang et al., 2023): SVD-form updates whose ranks are reallocated while training.

    The rank budget follows a schedule over the whole run, so the training loop must call
    :meth:`configure_schedule` with the number of optimizer steps before :meth:`apply`,
    and :meth:`on_optimizer_step` after every ``optimizer.step()`` (before ``zero_grad``:
    the importance scores read the gradients).
    """

    config_class = AdaLoraMethodConfig
    cfg: AdaLoraMethodConfig
    peft_type = "ADALORA"
    mergeable = True

    def __init__(self, cfg: AdaLoraMethodConfig):
        super().__init__(cfg)
        self.total_steps: int | None = None

    def configure_schedule(self, total_steps: int) -> None:
        """Tell AdaLoRA how many optimizer steps the run has (its budget schedule spans them)."""
        self.total_steps = total_steps

    def peft_config(self, model: "PreTrainedModel", tokenizer: "PreTrainedTokenizerBase") -> "PeftConfig":
        from peft import AdaLoraConfig

        cfg = self.cfg
        if cfg.target_r > cfg.init_r:
            raise ConfigError(f"AdaLoRA: method.target_r ({cfg.target_r}) is larger than method.init_r "
                              f"({cfg.init_r}); AdaLoRA only prunes ranks, so set target_r <= init_r.")
        return AdaLoraConfig(task_type="CAUSAL_LM", init_r=cfg.init_r, target_r=cfg.target_r,
                             lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=_targets(cfg.target),
                             modules_to_save=cfg.modules_to_save or None, **self.schedule())

    def schedule(self) -> dict[str, int]:
        """This run's rank-budget schedule, checked to leave room for allocation.

        Unset phases scale with the run (Zhang et al. 2023 set them per task, in steps): full
        rank for the first 10% of the steps, because the importance scores are moving averages
        of gradient x weight and mean nothing before a few updates; the final budget frozen for
        the last 20%, so the ranks kept get trained after the last pruning; about ten
        reallocations in between. Fixed step counts (PEFT's tinit=tfinal=0, deltaT=1) prune
        from the first step on noise in short runs and leave long ones a single phase.
        """
        cfg, total = self.cfg, self.total_steps
        if total is None:
            raise ConfigError("method.type 'adalora' needs the number of optimizer steps of the run before the "
                              "adapter is created: call configure_schedule(total_steps) before apply().")
        tinit = cfg.tinit if cfg.tinit is not None else total // 10
        tfinal = cfg.tfinal if cfg.tfinal is not None else total // 5
        if not tinit < total - tfinal:
            raise ConfigError(f"AdaLoRA: method.tinit ({tinit}) + method.tfinal ({tfinal}) leave no steps for rank "
                              f"allocation in a run of {total} optimizer steps. Lower tinit/tfinal (or leave them "
                              "unset to scale with the run) or train for more steps.")
        delta = cfg.deltaT if cfg.deltaT is not None else max(1, (total - tfinal - tinit) // 10)
        return {"tinit": tinit, "tfinal": tfinal, "deltaT": delta, "total_step": total}

    def load_trainable(self, base: "PreTrainedModel", path: Path) -> nn.Module:
        """Continue an AdaLoRA adapter (ranks as saved) under this run's budget schedule."""
        from peft import PeftConfig, PeftModel

        config = PeftConfig.from_pretrained(str(path))
        for key, value in self.schedule().items():
            setattr(config, key, value)
        return PeftModel.from_pretrained(base, str(path), adapter_name=ADAPTER_NAME, config=config,
                                         is_trainable=True)

    def on_optimizer_step(self, model: nn.Module, step: int) -> None:
        """Update importance scores and prune to the rank budget of global optimizer step ``step``."""
        model.base_model.update_and_allocate(step)


@register("ia3")
class IA3(PeftMethod):
    """(IA)^3 (Liu et al., 2022): learned rescaling of keys, values and FFN activations.

    ``target: all-linear`` (the default) means the paper's choice, which PEFT knows per
    architecture (Llama: k_proj, v_proj and down_proj, the last scaled on its input as the
    feed-forward module).
    """

    config_class = IA3MethodConfig
    cfg: IA3MethodConfig
    peft_type = "IA3"
    mergeable = True

    def peft_config(self, model: "PreTrainedModel", tokenizer: "PreTrainedTokenizerBase") -> "PeftConfig":
        from peft import IA3Config

        target = None if self.cfg.target == "all-linear" else _targets(self.cfg.target)
        return IA3Config(task_type="CAUSAL_LM", target_modules=target,
                         feedforward_modules=self.cfg.feedforward_modules,
                         modules_to_save=self.cfg.modules_to_save or None)
