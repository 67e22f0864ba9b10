"""``finetune train``: supervised fine-tuning on the single answer token, with the transformers Trainer.

Each example is the exact text the programs send for a self-evaluation (prompt, response or prefix,
evaluation turn, opened assistant turn) followed by the answer token ("No" or "Yes"); the loss is the
cross-entropy of that one token (or, with soft labels, of the two answers weighted by the empirical
P(win or tie)). Optional KL guard: KL(frozen base || model) of the next-token distributions on the
response tokens, so the policy's own generations stay put. LoRA (peft) is merged on export; full
fine-tuning is the same loop. ``accelerate launch`` runs it on several GPUs unchanged (Trainer).
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from sgl_adaptive.errors import UserError
from sgl_adaptive.finetune.labels import KEEP_LABEL, RETRY_LABEL
from sgl_adaptive.finetune.scoring import SelfEvalEncoder, left_pad

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
    soft_labels: bool = False
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
    """Left-pads a batch so the answer token is the last column; ``labels`` is -100 everywhere except
    that column (the standard causal-LM format: the model's own loss equals ours). With the KL guard,
    ``response_mask`` marks the positions that predict a response token."""

    def __init__(self, pad_id: int, with_response: bool = False) -> None:
        self.pad_id, self.with_response = pad_id, with_response

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        import torch

        ids, mask, positions = left_pad([f["input_ids"] for f in features], self.pad_id)
        labels = torch.full_like(ids, -100)
        labels[:, -1] = ids[:, -1]
        batch = {
            "input_ids": ids,
            "attention_mask": mask,
            "position_ids": positions,
            "labels": labels,
            "soft_no": torch.tensor([f["soft_no"] for f in features], dtype=torch.float32),
        }
        if self.with_response:
            response = torch.zeros_like(ids, dtype=torch.bool)
            width = ids.shape[1]
            for row, f in enumerate(features):
                start, end = f["response"]
                offset = width - len(f["input_ids"])
                if end > start:  # position p predicts token p + 1
                    response[row, offset + max(start - 1, 0) : offset + end - 1] = True
            batch["response_mask"] = response
        return batch


def one_token_loss(
    logits: Any, labels: Any, answer_ids: tuple[int, int], soft_no: Any | None = None
) -> tuple[Any, Any]:
    """Per-example loss from the logits at the position before the last (which predict the answer).

    ``logits``: (batch, vocab) at that position; ``labels``: the collator's labels. Hard: -log P(target).
    Soft: -(q log P(No) + (1 - q) log P(Yes)), q = ``soft_no``. Returns (loss per example, log-probs)."""
    import torch

    logp = torch.log_softmax(logits.float(), dim=-1)
    if soft_no is None:
        loss = -logp.gather(1, labels[:, -1:].to(logp.device)).squeeze(1)
    else:
        no_id, yes_id = answer_ids
        q = soft_no.to(logp.device)
        loss = -(q * logp[:, no_id] + (1 - q) * logp[:, yes_id])
    return loss, logp


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

        def compute_loss(
            self,
            model: Any,
            inputs: dict[str, Any],
            return_outputs: bool = False,
            num_items_in_batch: Any = None,
        ):
            labels = inputs.pop("labels")
            soft = inputs.pop("soft_no")
            response = inputs.pop("response_mask", None)
            kl_on = response is not None and self.settings.kl_weight > 0 and bool(response.any())
            keep = inputs["input_ids"].shape[1] - int(response.float().argmax(-1).min()) if kl_on else 2
            outputs = model(**inputs, logits_to_keep=max(keep, 2))
            logits = outputs.logits
            loss, _ = one_token_loss(
                logits[:, -2], labels, self.answer_ids, soft if self.settings.soft_labels else None
            )
            loss = loss.mean()
            if kl_on:
                tail = response[:, -logits.shape[1] :]
                with torch.no_grad():
                    teacher = self._teacher_logits(model, inputs, logits.shape[1])
                t_logp = torch.log_softmax(teacher[tail].float(), -1)
                s_logp = torch.log_softmax(logits[tail].float(), -1)
                kl = (t_logp.exp() * (t_logp - s_logp)).sum(-1).mean()
                loss = loss + self.settings.kl_weight * kl
            return (loss, outputs) if return_outputs else loss

        def _teacher_logits(self, model: Any, inputs: dict[str, Any], keep: int) -> Any:
            if self.ref_model is not None:
                return self.ref_model(**inputs, logits_to_keep=keep).logits
            unwrapped = self.accelerator.unwrap_model(model)
            with unwrapped.disable_adapter():  # LoRA: the base model is the adapter switched off
                return unwrapped(**inputs, logits_to_keep=keep).logits

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
    (in the export dtype, without a tokenizer: the base's is used)."""
    out.mkdir(parents=True, exist_ok=True)
    if settings.lora and (settings.save_adapter or settings.adapter_only):
        lora_state = {k: v.detach().to(dtype) for k, v in model.state_dict().items() if "lora_" in k}
        model.save_pretrained(out / "adapter", state_dict=lora_state)
        (out / "adapter" / CHECKPOINT_INFO).write_text(json.dumps(info, indent=2) + "\n")
    if settings.lora and settings.adapter_only:
        return
    merged = model.merge_and_unload() if settings.lora else model
    merged.to(dtype).save_pretrained(out, safe_serialization=True)
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
        bf16=use_bf16(settings, use_cuda),
        use_cpu=not use_cuda,
        gradient_checkpointing=settings.gradient_checkpointing,
        remove_unused_columns=False,
        dataloader_num_workers=0,
        train_sampling_strategy="group_by_length",  # batches of similar lengths: little left-padding (prefixes vs full responses)
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
    """Train on ``DATA/train.jsonl``, report the held-out loss/mass/AUROC before and after, export.

    Under ``accelerate launch`` every process trains; only the main one scores the held-out set,
    exports, and gets ``report["exported"]``."""
    import torch

    from sgl_adaptive.data import read_jsonl
    from sgl_adaptive.finetune.evaluate import summarize
    from sgl_adaptive.finetune.scoring import load_causal_lm, score_examples

    train_examples = list(read_jsonl(data_dir / "train.jsonl"))
    heldout = list(read_jsonl(data_dir / "heldout.jsonl")) if (data_dir / "heldout.jsonl").is_file() else []
    heldout = heldout[:heldout_limit] if heldout_limit is not None else heldout  # 0: skip the scoring
    if not train_examples:
        raise UserError(f"{data_dir / 'train.jsonl'} has no examples")
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
        "dropped_too_long": dropped,
        "processes": args.world_size,
    }
    if main and heldout:
        report["before"] = _heldout_line(
            summarize(heldout, score_examples(model, encoder, heldout)), "untrained", log
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
    )
    result = trainer.train()
    report["train_loss"] = result.training_loss
    report["steps"] = result.global_step
    if not trainer.is_world_process_zero():
        return report
    # without the autocast wrapper that mixed precision put on forward: score and export in full precision
    model = trainer.accelerator.unwrap_model(trainer.model, keep_fp32_wrapper=False).eval()
    if heldout:
        report["after"] = _heldout_line(
            summarize(heldout, score_examples(model, encoder, heldout)), "trained", log
        )
    info = {
        "base_model": model_path,
        "data": str(data_dir.resolve()),
        "settings": {**asdict(settings), "learning_rate": settings.learning_rate},
        "export_dtype": str(dtype).removeprefix("torch."),
        "report": _finite(report),
    }
    shutil.rmtree(out / "trainer", ignore_errors=True)
    export(model, tokenizer, out, settings, dtype, info)
    report["exported"] = str(out)
    return report


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
