"""``finetune train``: supervised fine-tuning on the single answer token, with the transformers Trainer.

Each example is the exact text the programs send for a self-evaluation (prompt, response or prefix,
evaluation turn, opened assistant turn) followed by the answer token ("No" or "Yes"). The loss is the
cross-entropy of that one token. By default the target is the paper's pairwise one: "No" with the
empirical P(win or tie) against another sample of the same prompt (``soft_no``); ``soft_labels``
False trains on the hard label "no other sample beats it". Optional KL guard: KL(frozen base || model)
of the next-token distributions on the response tokens, so the policy's own generations stay put.
LoRA (peft) is merged on export; full fine-tuning is the same loop. ``accelerate launch`` runs it on
several GPUs unchanged (Trainer).

Batches are right-padded and mask-free (``batching.py`` says why), and the cuDNN attention kernels
are off while training. A non-finite loss or gradient stops the run with a one-line error naming the
step, before the optimizer applies it; export refuses non-finite weights. Nothing is written then.
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from sgl_adaptive.errors import UserError
from sgl_adaptive.finetune.batching import HeadGather, right_pad
from sgl_adaptive.finetune.labels import KEEP_LABEL, RETRY_LABEL
from sgl_adaptive.finetune.scoring import SelfEvalEncoder
from sgl_adaptive.weights import check_finite

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
CHECKPOINT_INFO = "sgl-adaptive-finetune.json"


@dataclass(frozen=True)
class TrainSettings:
    """Defaults are the recipe for the 0.5B model: LoRA r=16 on attention and MLP projections,
    lr 1e-4 (1e-5 for full fine-tuning), one epoch, cosine schedule with 5% warm-up."""

    lora: bool = False
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    epochs: float = 1.0
    lr: float | None = None
    """None: 1e-4 with LoRA, 1e-5 for full fine-tuning."""
    max_steps: int = -1
    batch_size: int = 8
    grad_accum: int = 1
    warmup_ratio: float = 0.05
    weight_decay: float = 0.0
    max_length: int = 2048
    """Examples longer than this (tokens, with the evaluation turn) are dropped and counted."""
    soft_labels: bool = True
    """True: the pairwise target P(win or tie) (the paper's); False: the hard "no sibling beats it"."""
    max_examples: int | None = None
    """Train on a seeded random subset of this many examples (None: all), for short CPU runs."""
    budgets: tuple[str, ...] | None = None
    """Train only on these truncation budgets ("full" and token counts as strings; None: all)."""
    kl_weight: float = 0.0
    """Weight of the KL guard on response tokens (0: off)."""
    lora_layers: int | None = None
    """With LoRA: adapt only the last N transformer layers (None: all). The backward pass then stops
    at the lowest adapted layer: on a CPU the last 8 of 24 layers train about 1.7× faster."""
    mixed_precision: str = "auto"
    """auto: bf16 autocast on bf16 GPUs and on CPUs with native bf16 (3.6× faster on this project's CPU);
    no: fp32 throughout. Master weights stay fp32 either way."""
    gradient_checkpointing: bool = False
    seed: int = 0
    logging_steps: int = 10
    export_dtype: str = "auto"
    """auto (the base checkpoint's dtype), float32, bfloat16 or float16."""
    save_adapter: bool = True
    """With LoRA: also write the adapter alone to ``OUT/adapter`` (small enough to commit)."""
    adapter_only: bool = False
    """With LoRA: write only the adapter (no merged checkpoint)."""

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else (1e-4 if self.lora else 1e-5)


def encode_examples(
    examples: Sequence[dict[str, Any]], encoder: SelfEvalEncoder, max_length: int, with_response: bool
) -> tuple[list[dict[str, Any]], int]:
    """Token ids (evaluation prompt + answer token) per example; returns (features, dropped as too long)."""
    features, dropped = [], 0
    for ex in examples:
        if ex["label"] not in (KEEP_LABEL, RETRY_LABEL):
            raise UserError(f"example of prompt {ex.get('prompt_id')} has label {ex['label']!r}, not No/Yes")
        if with_response:
            ids, start, end = encoder.prompt_ids_and_response(ex["prompt"], ex["text"])
        else:
            ids, start, end = encoder.prompt_ids(ex["prompt"], ex["text"]), 0, 0
        if len(ids) + 1 > max_length:
            dropped += 1
            continue
        features.append(
            {
                "input_ids": ids + [encoder.target_id(ex["label"])],
                "soft_no": float(ex.get("soft_no", 1.0 if ex["label"] == KEEP_LABEL else 0.0)),
                "response": (start, end),
            }
        )
    return features, dropped


class OneTokenCollator:
    """Right-pads a batch without an attention mask (see ``batching``).

    ``gather_index[:, 0]`` is each row's position ``len - 2``, whose logits predict the answer token;
    ``targets`` holds that token. ``labels`` is -100 everywhere except the answer token (the standard
    causal-LM format: the model's own loss equals ours). With the KL guard, ``gather_index[:, 1:]``
    lists the positions that predict response tokens and ``gather_valid`` marks the real ones."""

    def __init__(self, pad_id: int, with_response: bool = False) -> None:
        self.pad_id, self.with_response = pad_id, with_response

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        import torch

        ids, lengths = right_pad([f["input_ids"] for f in features], self.pad_id)
        rows = torch.arange(len(features))
        labels = torch.full_like(ids, -100)
        labels[rows, lengths - 1] = ids[rows, lengths - 1]
        columns = [[int(n) - 2] for n in lengths]
        if self.with_response:
            for column, f in zip(columns, features, strict=True):
                start, end = f["response"]
                column += range(max(start - 1, 0), end - 1)  # position p predicts token p + 1
        width = max(len(c) for c in columns)
        index = torch.tensor([c + [c[0]] * (width - len(c)) for c in columns], dtype=torch.long)
        valid = torch.tensor([[True] * len(c) + [False] * (width - len(c)) for c in columns])
        return {
            "input_ids": ids,
            "labels": labels,
            "targets": ids[rows, lengths - 1],
            "soft_no": torch.tensor([f["soft_no"] for f in features], dtype=torch.float32),
            "gather_index": index,
            "gather_valid": valid,
        }


def one_token_loss(
    logits: Any, targets: Any, answer_ids: tuple[int, int], soft_no: Any | None = None
) -> tuple[Any, Any]:
    """Per-example loss from the logits that predict the answer token.

    ``logits``: (batch, vocab); ``targets``: (batch,) answer token ids. Hard: -log P(target).
    Soft: -(q log P(No) + (1 - q) log P(Yes)), q = ``soft_no`` (a weight of 0 contributes exactly 0,
    even where a log-probability is -inf). Returns (loss per example, log-probs)."""
    import torch

    logp = torch.log_softmax(logits.float(), dim=-1)
    if soft_no is None:
        loss = -logp.gather(1, targets.reshape(-1, 1).to(logp.device)).squeeze(1)
    else:
        no_id, yes_id = answer_ids
        q = soft_no.to(logp.device)
        loss = -(_weighted(q, logp[:, no_id]) + _weighted(1 - q, logp[:, yes_id]))
    return loss, logp


def _weighted(weight: Any, logp: Any) -> Any:
    """weight · logp, with 0 where the weight is 0 (0 · -inf would be NaN)."""
    import torch

    return torch.where(weight > 0, weight * logp, torch.zeros_like(logp))


class TrainingDivergedError(UserError):
    """A non-finite loss or gradient: training stops before the optimizer applies it."""


def _diverged(what: str, step: int, detail: str = "") -> TrainingDivergedError:
    return TrainingDivergedError(
        f"training stopped at step {step}: non-finite {what}{detail}; nothing was exported "
        "(lower --lr, or check the data)"
    )


def non_finite_gradients(model: Any) -> list[str]:
    """Names of the trainable parameters whose gradient holds a NaN or an inf (one device sync)."""
    import torch

    named = [(n, p.grad) for n, p in model.named_parameters() if p.requires_grad and p.grad is not None]
    if not named:
        return []
    finite = torch.stack([torch.isfinite(g).all() for _, g in named]).cpu()
    return [n for (n, _), ok in zip(named, finite.tolist(), strict=True) if not ok]


@contextmanager
def training_attention_kernels() -> Iterator[None]:
    """cuDNN's SDPA kernels off for the duration (flash / memory-efficient / math remain).

    Their backward has returned NaN gradients on Hopper GPUs in shapes a fine-tuning batch can take
    (pytorch/pytorch#196678; huggingface/trl#7181), at no throughput cost when off for this model."""
    import torch

    before = torch.backends.cuda.cudnn_sdp_enabled()
    torch.backends.cuda.enable_cudnn_sdp(False)
    try:
        yield
    finally:
        torch.backends.cuda.enable_cudnn_sdp(before)


def _finite_gradient_guard() -> Any:
    """A TrainerCallback that stops training before an optimizer step with a non-finite gradient."""
    from transformers import TrainerCallback

    class FiniteGradientGuard(TrainerCallback):
        def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, model: Any = None, **kw: Any):
            bad = non_finite_gradients(model)
            if bad:
                raise _diverged("gradient", state.global_step + 1, f" in {len(bad)} tensor(s), e.g. {bad[0]}")
            return control

    return FiniteGradientGuard()


def _trainer_class() -> type:
    import torch
    from transformers import Trainer

    class OneTokenTrainer(Trainer):
        """Trainer whose loss is the answer token's (plus the optional KL guard)."""

        loss_is_scaled_for_ga = False  # we return a mean over the micro-batch

        def __init__(
            self,
            *args: Any,
            answer_ids: tuple[int, int],
            settings: TrainSettings,
            ref_model: Any = None,
            **kw: Any,
        ):
            super().__init__(*args, **kw)
            self.answer_ids, self.settings, self.ref_model = answer_ids, settings, ref_model
            self.gather = HeadGather(self.model)
            self.ref_gather = HeadGather(ref_model) if ref_model is not None else None

        def compute_loss(
            self,
            model: Any,
            inputs: dict[str, Any],
            return_outputs: bool = False,
            num_items_in_batch: Any = None,
        ):
            inputs.pop("labels")
            targets, soft = inputs.pop("targets"), inputs.pop("soft_no")
            index, valid = inputs.pop("gather_index"), inputs.pop("gather_valid")
            with self.gather.at(index):
                outputs = model(**inputs, logits_to_keep=0)  # logits at ``index`` only
            logits = outputs.logits
            loss, _ = one_token_loss(
                logits[:, 0], targets, self.answer_ids, soft if self.settings.soft_labels else None
            )
            loss = loss.mean()
            response = valid[:, 1:]
            if self.settings.kl_weight > 0 and bool(response.any()):
                with torch.no_grad():
                    teacher = self._teacher_logits(model, inputs, index)
                t_logp = torch.log_softmax(teacher[:, 1:][response].float(), -1)
                s_logp = torch.log_softmax(logits[:, 1:][response].float(), -1)
                kl = (t_logp.exp() * (t_logp - s_logp)).sum(-1).mean()
                loss = loss + self.settings.kl_weight * kl
            if not bool(torch.isfinite(loss.detach())):
                raise _diverged("loss", self.state.global_step + 1, f" ({float(loss.detach())})")
            return (loss, outputs) if return_outputs else loss

        def _teacher_logits(self, model: Any, inputs: dict[str, Any], index: Any) -> Any:
            if self.ref_model is not None:
                with self.ref_gather.at(index):
                    return self.ref_model(**inputs, logits_to_keep=0).logits
            unwrapped = self.accelerator.unwrap_model(model)
            with unwrapped.disable_adapter(), self.gather.at(index):  # LoRA: the base is the adapter off
                return unwrapped(**inputs, logits_to_keep=0).logits

    return OneTokenTrainer


def lora_layer_ids(model: Any, settings: TrainSettings) -> list[int] | None:
    """The layers LoRA adapts: the last ``settings.lora_layers`` of the model (None: all)."""
    if settings.lora_layers is None:
        return None
    config = getattr(model.config, "text_config", None) or model.config
    total = int(config.num_hidden_layers)
    if not 1 <= settings.lora_layers <= total:
        raise UserError(f"--lora-layers must be within [1, {total}] (got {settings.lora_layers})")
    return list(range(total - settings.lora_layers, total))


def _lora(model: Any, settings: TrainSettings) -> Any:
    from peft import LoraConfig, get_peft_model

    names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    targets: Any = [t for t in LORA_TARGETS if t in names] or "all-linear"
    config = LoraConfig(
        layers_to_transform=lora_layer_ids(model, settings),
        r=settings.lora_r,
        lora_alpha=settings.lora_alpha,
        lora_dropout=settings.lora_dropout,
        target_modules=targets,
        task_type="CAUSAL_LM",
    )
    if settings.gradient_checkpointing:
        model.enable_input_require_grads()
    return get_peft_model(model, config)


def _export_dtype(model_path: str, name: str) -> Any:
    """The dtype of the exported weights: ``auto`` is the base checkpoint's own (bf16 for the 0.5B model)."""
    import torch
    from transformers import AutoConfig

    if name == "auto":
        config = AutoConfig.from_pretrained(model_path)
        value = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
        if isinstance(value, str):
            value = getattr(torch, value, None)
        return value if isinstance(value, torch.dtype) else torch.float32
    if name not in ("float32", "bfloat16", "float16"):
        raise UserError(f"--export-dtype must be auto, float32, bfloat16 or float16 (got {name!r})")
    return getattr(torch, name)


def export(
    model: Any, tokenizer: Any, out: Path, settings: TrainSettings, dtype: Any, info: dict[str, Any]
) -> None:
    """Write the checkpoint (merged when LoRA) with tokenizer and chat template, and/or the adapter alone
    (in the export dtype, without a tokenizer: the base's is used). Refuses non-finite weights (before
    and after the cast to the export dtype, which can overflow) and then writes nothing."""
    check_finite(model, "the trained model")
    lora_state = {k: v.detach().to(dtype) for k, v in model.state_dict().items() if "lora_" in k}
    check_finite(lora_state, f"the trained adapter in {str(dtype).removeprefix('torch.')}")
    out.mkdir(parents=True, exist_ok=True)
    if settings.lora and (settings.save_adapter or settings.adapter_only):
        model.save_pretrained(out / "adapter", state_dict=lora_state)
        (out / "adapter" / CHECKPOINT_INFO).write_text(json.dumps(info, indent=2) + "\n")
    if settings.lora and settings.adapter_only:
        return
    merged = (model.merge_and_unload() if settings.lora else model).to(dtype)
    try:
        check_finite(merged, f"the merged model in {str(dtype).removeprefix('torch.')}")
    except UserError:
        shutil.rmtree(out / "adapter", ignore_errors=True)
        raise
    merged.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    (out / CHECKPOINT_INFO).write_text(json.dumps(info, indent=2) + "\n")


def use_bf16(settings: TrainSettings, use_cuda: bool) -> bool:
    """Whether to train under bf16 autocast (see ``TrainSettings.mixed_precision``)."""
    import torch

    from sgl_adaptive.backends.precision import cpu_has_fast_bf16

    if settings.mixed_precision not in ("auto", "no"):
        raise UserError(f"--mixed-precision must be auto or no (got {settings.mixed_precision!r})")
    if settings.mixed_precision == "no":
        return False
    return torch.cuda.is_bf16_supported() if use_cuda else cpu_has_fast_bf16()


def training_arguments(settings: TrainSettings, out: Path, use_cuda: bool) -> Any:
    """The Trainer's arguments (creating them sets up the distributed state under ``accelerate launch``)."""
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=str(out / "trainer"),
        per_device_train_batch_size=settings.batch_size,
        gradient_accumulation_steps=settings.grad_accum,
        learning_rate=settings.learning_rate,
        num_train_epochs=settings.epochs,
        max_steps=settings.max_steps,
        warmup_steps=settings.warmup_ratio,  # a float < 1 is a ratio of the total steps
        weight_decay=settings.weight_decay,
        lr_scheduler_type="cosine",
        logging_steps=settings.logging_steps,
        save_strategy="no",
        report_to="none",
        seed=settings.seed,
        data_seed=settings.seed,
        logging_nan_inf_filter=False,  # a non-finite loss stops the run; never average it away
        bf16=use_bf16(settings, use_cuda),
        use_cpu=not use_cuda,
        gradient_checkpointing=settings.gradient_checkpointing,
        remove_unused_columns=False,
        dataloader_num_workers=0,
        train_sampling_strategy="group_by_length",  # batches of similar lengths: little padding (prefixes vs full responses)
        ddp_find_unused_parameters=False,
    )


def train(
    model_path: str,
    data_dir: Path,
    out: Path,
    settings: TrainSettings,
    *,
    device: str | None = None,
    heldout_limit: int | None = None,
    log: Any = print,
) -> dict[str, Any]:
    """Train on ``DATA/train.jsonl``, report the held-out loss/mass/AUROC before and after (one packed
    forward per held-out prompt), export.

    Under ``accelerate launch`` every process trains; only the main one scores the held-out set,
    exports, and gets ``report["exported"]``. On any failure an ``out`` this call created is removed:
    a diverged run leaves no weights behind."""
    created = not out.exists()
    try:
        return _train_and_export(model_path, data_dir, out, settings, device, heldout_limit, log)
    except BaseException:
        if created:
            shutil.rmtree(out, ignore_errors=True)
        raise


def _train_and_export(
    model_path: str,
    data_dir: Path,
    out: Path,
    settings: TrainSettings,
    device: str | None,
    heldout_limit: int | None,
    log: Any,
) -> dict[str, Any]:
    import torch

    from sgl_adaptive.data import read_jsonl
    from sgl_adaptive.finetune.evaluate import summarize
    from sgl_adaptive.finetune.packing import score_packed
    from sgl_adaptive.finetune.scoring import load_causal_lm

    if not (data_dir / "train.jsonl").is_file():
        raise UserError(f"{data_dir} has no train.jsonl (run `sgl-adaptive finetune data` first)")
    train_examples = select_examples(list(read_jsonl(data_dir / "train.jsonl")), settings)
    heldout = list(read_jsonl(data_dir / "heldout.jsonl")) if (data_dir / "heldout.jsonl").is_file() else []
    heldout = heldout[:heldout_limit] if heldout_limit is not None else heldout  # 0: skip the scoring
    if not train_examples:
        raise UserError(f"{data_dir / 'train.jsonl'} has no examples (after --budgets / --max-examples)")
    dtype = _export_dtype(model_path, settings.export_dtype)
    args = training_arguments(settings, out, use_cuda=torch.cuda.is_available() and device != "cpu")
    main = args.process_index == 0
    model, tokenizer = load_causal_lm(model_path, device=str(args.device), dtype=torch.float32)
    lora_layer_ids(model, settings)  # a bad --lora-layers fails before any scoring
    encoder = SelfEvalEncoder(tokenizer)
    answer_ids = (encoder.target_id(KEEP_LABEL), encoder.target_id(RETRY_LABEL))
    with_response = settings.kl_weight > 0
    features, dropped = encode_examples(train_examples, encoder, settings.max_length, with_response)
    if not features:
        raise UserError(f"every training example is longer than --max-length {settings.max_length}")

    report: dict[str, Any] = {
        "train_examples": len(features),
        "train_prompts": len({ex.get("prompt_id") for ex in train_examples}),
        "dropped_too_long": dropped,
        "labels": "pairwise P(win or tie)" if settings.soft_labels else "hard (no sibling beats it)",
        "processes": args.world_size,
    }
    if main and heldout:
        report["before"] = _heldout_line(
            summarize(heldout, score_packed(model, encoder, heldout)), "untrained", log
        )
    ref_model = None
    if settings.kl_weight > 0 and not settings.lora:
        ref_model, _ = load_causal_lm(model_path, device=str(args.device), dtype=torch.float32)
        ref_model.requires_grad_(False)
    if settings.lora:
        from transformers import set_seed

        set_seed(settings.seed)  # the adapter's initialisation
        model = _lora(model, settings)
    elif settings.gradient_checkpointing:
        model.config.use_cache = False
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    trainer = _trainer_class()(
        model=model,
        args=args,
        train_dataset=features,
        data_collator=OneTokenCollator(pad, with_response),
        answer_ids=answer_ids,
        settings=settings,
        ref_model=ref_model,
        callbacks=[_finite_gradient_guard()],
    )
    try:
        # the Trainer's progress and loss lines go to stderr: stdout is the report (``--json``)
        with training_attention_kernels(), contextlib.redirect_stdout(sys.stderr):
            result = trainer.train()
    finally:
        shutil.rmtree(out / "trainer", ignore_errors=True)
    report["train_loss"] = result.training_loss
    report["steps"] = result.global_step
    if not trainer.is_world_process_zero():
        return report
    # without the autocast wrapper that mixed precision put on forward: score and export in full precision
    model = trainer.accelerator.unwrap_model(trainer.model, keep_fp32_wrapper=False).eval()
    if heldout:
        report["after"] = _heldout_line(
            summarize(heldout, score_packed(model, encoder, heldout)), "trained", log
        )
    info = {
        "base_model": model_path,
        "data": str(data_dir.resolve()),
        "settings": {**asdict(settings), "learning_rate": settings.learning_rate},
        "export_dtype": str(dtype).removeprefix("torch."),
        "report": _finite(report),
    }
    export(model, tokenizer, out, settings, dtype, info)
    report["exported"] = str(out)
    return report


def select_examples(examples: list[dict[str, Any]], settings: TrainSettings) -> list[dict[str, Any]]:
    """The training examples ``settings.budgets`` and ``settings.max_examples`` keep (a seeded subset)."""
    import random

    if settings.budgets is not None:
        wanted = set(settings.budgets)
        examples = [ex for ex in examples if _budget_name(ex) in wanted]
    if settings.max_examples is not None and settings.max_examples < len(examples):
        examples = random.Random(settings.seed).sample(examples, settings.max_examples)
    return examples


def _budget_name(example: dict[str, Any]) -> str:
    budget = example.get("truncated_tokens")
    return "full" if budget is None else str(budget)


def parse_train_budgets(spec: str | None) -> tuple[str, ...] | None:
    """``"full,64,128"`` -> ("full", "64", "128"); None or "all" -> None (every budget)."""
    if spec is None or spec.strip().lower() in ("", "all"):
        return None
    names = [p.strip().lower() for p in spec.split(",") if p.strip()]
    for name in names:
        if name != "full" and not (name.isdigit() and int(name) > 0):
            raise UserError(
                f"--budgets takes 'full' and positive token counts, e.g. full,64,128 (got {spec!r})"
            )
    return tuple(dict.fromkeys(names))


def _heldout_line(stats: dict[str, Any], which: str, log: Any) -> dict[str, Any]:
    log(
        f"{which}, held-out ({stats['n']} examples): loss {stats['loss']:.4f}, "
        f"Yes/No mass {stats['answer_mass']:.3f}, AUROC {stats['auroc']:.3f}, Brier {stats['brier']:.4f}"
    )
    return stats


def _finite(obj: Any) -> Any:
    """JSON-safe copy: nan/inf become None."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_finite(v) for v in obj]
    return obj
