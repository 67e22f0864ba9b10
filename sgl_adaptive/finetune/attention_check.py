"""Device check of the GPU NaN: do attention gradients go non-finite, by batch layout and kernel?

    python -m sgl_adaptive.finetune.attention_check --model DIR --data DATA_DIR --out check.json

One forward and backward of the training loss on one real batch whose padded width is 64 mod 128,
in four variants: the old layout (left padding + attention mask) and the current one (right
padding, no mask), each with cuDNN attention on and off, under bf16 autocast on a GPU. On CUDA it
also runs the bare kernel with a causal mask whose rows all have a log-sum-exp below ln(FLT_MAX),
per SDPA backend. It prints and writes one JSON object with, per variant, the loss and how many
parameter gradients are non-finite. On a CPU it runs the model variants in fp32 (all finite is the
expected answer there) so the script itself is tested without a GPU.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

WIDTH_MOD = (64, 128)
"""cuDNN's failing shapes: sequence length 64 mod 128 (pytorch/pytorch#196678)."""


def pick_rows(lengths: list[int], rows: int, target_mod: tuple[int, int] = WIDTH_MOD) -> list[int]:
    """Indices of ``rows`` examples whose longest has a length ≡ target (mod m), the rest shorter and
    of mixed lengths (so the left-padded batch has pad rows); [] when no length fits."""
    rest, mod = target_mod
    fitting = sorted((i for i, n in enumerate(lengths) if n % mod == rest), key=lambda i: -lengths[i])
    if not fitting:
        return []
    longest = fitting[0]
    shorter = sorted((i for i, n in enumerate(lengths) if n < lengths[longest]), key=lambda i: lengths[i])
    step = max(len(shorter) // max(rows - 1, 1), 1)
    return [longest, *shorter[::step][: rows - 1]]


def _batch(features: list[dict[str, Any]], pad: int, layout: str) -> tuple[dict[str, Any], Any, Any]:
    """(model inputs, answer-predicting position per row, targets) for ``layout`` left or right."""
    import torch

    from sgl_adaptive.finetune.batching import right_pad
    from sgl_adaptive.finetune.scoring import left_pad

    rows = [f["input_ids"] for f in features]
    targets = torch.tensor([r[-1] for r in rows])
    if layout == "left":
        ids, mask, pos = left_pad(rows, pad)
        inputs = {"input_ids": ids, "attention_mask": mask, "position_ids": pos}
        return inputs, torch.full((len(rows), 1), ids.shape[1] - 2), targets
    ids, lengths = right_pad(rows, pad)
    return {"input_ids": ids}, (lengths - 2)[:, None], targets


def model_variant(
    model: Any, features: list[dict[str, Any]], pad: int, layout: str, cudnn: bool, device: str
) -> dict[str, Any]:
    """Loss and non-finite gradient count of one forward/backward of the answer-token loss."""
    import torch

    from sgl_adaptive.finetune.batching import HeadGather, fully_masked_query_rows
    from sgl_adaptive.finetune.train import non_finite_gradients, one_token_loss

    inputs, index, targets = _batch(features, pad, layout)
    model.zero_grad(set_to_none=True)
    before = torch.backends.cuda.cudnn_sdp_enabled()
    torch.backends.cuda.enable_cudnn_sdp(cudnn)
    try:
        with (
            HeadGather(model) as gather,
            gather.at(index),
            torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=device == "cuda"),
        ):
            logits = model(**{k: v.to(device) for k, v in inputs.items()}, logits_to_keep=0).logits
        loss = one_token_loss(logits[:, 0], targets.to(device), (0, 0))[0].mean()
        loss.backward()
    finally:
        torch.backends.cuda.enable_cudnn_sdp(before)
    bad = non_finite_gradients(model)
    return {
        "layout": layout,
        "cudnn_sdp": cudnn,
        "width": int(inputs["input_ids"].shape[1]),
        "fully_masked_query_rows": fully_masked_query_rows(
            inputs.get("attention_mask"), int(inputs["input_ids"].shape[1])
        ),
        "loss": float(loss.detach()),
        "non_finite_gradients": len(bad),
        "example_bad_tensor": bad[0] if bad else None,
    }


def kernel_variants(width: int = 704, head_dim: int = 64) -> list[dict[str, Any]]:
    """The bare SDPA backward per backend, causal boolean mask, every row's log-sum-exp < -88.7."""
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel

    out = []
    for name in ("CUDNN_ATTENTION", "EFFICIENT_ATTENTION", "FLASH_ATTENTION", "MATH"):
        for explicit_mask in (True, False):
            gen = torch.Generator(device="cuda").manual_seed(0)
            shape = (1, 1, width, head_dim)
            q = torch.randn(shape, device="cuda", generator=gen, dtype=torch.bfloat16) * 0.1
            k = torch.randn(shape, device="cuda", generator=gen, dtype=torch.bfloat16) * 0.1
            v = torch.randn(shape, device="cuda", generator=gen, dtype=torch.bfloat16)
            q[..., 0], k[..., 0] = 1.0, -120 * math.sqrt(head_dim)  # one dominant, very negative logit
            q, k, v = (t.requires_grad_() for t in (q, k, v))
            mask = torch.ones(width, width, dtype=torch.bool, device="cuda").tril()[None, None]
            row: dict[str, Any] = {"backend": name, "explicit_mask": explicit_mask, "width": width}
            try:
                with sdpa_kernel(getattr(SDPBackend, name)):
                    o = torch.nn.functional.scaled_dot_product_attention(
                        q, k, v, attn_mask=mask if explicit_mask else None, is_causal=not explicit_mask
                    )
                    o.backward(torch.randn(o.shape, device="cuda", generator=gen, dtype=o.dtype))
                row["non_finite_grad_q"] = int((~torch.isfinite(q.grad)).sum())
            except RuntimeError as exc:  # backend not available for this shape / dtype
                row["error"] = str(exc).splitlines()[0][:160]
            out.append(row)
    return out


def run_check(model_path: str, data_dir: Path, rows: int = 16, device: str | None = None) -> dict[str, Any]:
    import torch

    from sgl_adaptive.data import read_jsonl
    from sgl_adaptive.finetune.scoring import SelfEvalEncoder, load_causal_lm
    from sgl_adaptive.finetune.train import encode_examples

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, tokenizer = load_causal_lm(model_path, device=device, dtype=torch.float32)  # fp32 master weights
    examples = list(read_jsonl(data_dir / "train.jsonl"))[:4000]
    features, _ = encode_examples(examples, SelfEvalEncoder(tokenizer), 4096, with_response=False)
    chosen = pick_rows([len(f["input_ids"]) for f in features], rows)
    report: dict[str, Any] = {
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "cudnn": torch.backends.cudnn.version() if device == "cuda" else None,
        "rows": len(chosen),
    }
    if not chosen:
        report["error"] = "no training example has a length of 64 mod 128"
        return report
    batch = [features[i] for i in chosen]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    report["model"] = [
        model_variant(model, batch, pad, layout, cudnn, device)
        for layout in ("left", "right")
        for cudnn in (True, False)
    ]
    if device == "cuda":
        report["kernel"] = kernel_variants()
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="HF model directory (the base to fine-tune).")
    parser.add_argument("--data", required=True, type=Path, help="Directory with train.jsonl.")
    parser.add_argument("--out", type=Path, help="Also write the JSON here.")
    parser.add_argument("--rows", type=int, default=16, help="Rows of the batch.")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available).")
    args = parser.parse_args(argv)
    report = run_check(args.model, args.data, args.rows, args.device)
    text = json.dumps(report)
    if args.out:
        args.out.write_text(text + "\n")
    sys.stdout.write(text + "\n")
    return 1 if "error" in report else 0


if __name__ == "__main__":
    raise SystemExit(main())
