"""Embedding throughput: the production engine against a per-page loop, and against physics.

    .venv/bin/python bench/gpu_embed.py            # full-size models on CUDA, tiny ones on CPU
    .venv/bin/python bench/gpu_embed.py --quick    # fewer pages

With CUDA it builds full-size ColQwen2 (Qwen2-VL-2B) and ColPali (PaliGemma-3B-448)
from their real configurations, written out below because the hub is unreachable,
with RANDOM weights: a matmul costs the same whatever the numbers in it, so the
throughput is the throughput of the real model. Pages are A4 text pages drawn at the
size the splitter renders for the model (``render_target_for``) and JPEG-encoded,
as they arrive from Kafka.

Reported per model: pages/s of the production path (PipelinedEmbedder: bf16,
bucketed batches, pinned memory, pipelined pre/post-processing) and of a per-page
loop on the same device, their ratio (goal >= 10x), forward FLOPs per page counted
from the configuration for the actual token counts, achieved TFLOP/s and the
fraction of the peak (800 dense bf16 TFLOP/s by default; goal >= 0.6), peak GPU
memory and the batch size used.

Without CUDA it runs the same code on the tiny random-weights checkpoints and says so.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from colstream.embedding.engine import EmbedItem, PipelinedEmbedder
from colstream.embedding.model import EmbeddingModel, load_model, resolve_attn_implementation
from colstream.embedding.profile import RenderTarget, render_target_for
from colstream.embedding.tiny import (
    build_colpali_processor,
    build_colqwen2_processor,
    ensure_tiny_checkpoint,
    mrope_section,
    qwen2_vl_token_ids,
)
from colstream.infra.settings import ModelSettings

REPO = Path(__file__).resolve().parents[1]
A4_ASPECT = 297 / 210

# -- real configurations ---------------------------------------------------------

# Qwen/Qwen2-VL-2B-Instruct, the base of vidore/colqwen2-v1.0.
QWEN2_VL_2B_TEXT: dict[str, Any] = {
    "vocab_size": 151936,
    "hidden_size": 1536,
    "intermediate_size": 8960,
    "num_hidden_layers": 28,
    "num_attention_heads": 12,
    "num_key_value_heads": 2,
    "hidden_act": "silu",
    "max_position_embeddings": 32768,
    "rms_norm_eps": 1e-6,
    "use_sliding_window": False,
    "sliding_window": 32768,
    "max_window_layers": 28,
    "rope_parameters": {"rope_type": "default", "rope_theta": 1_000_000.0, "mrope_section": [16, 24, 24]},
    "tie_word_embeddings": True,
}
QWEN2_VL_2B_VISION: dict[str, Any] = {
    "depth": 32,
    "embed_dim": 1280,
    "hidden_size": 1536,
    "mlp_ratio": 4,
    "num_heads": 16,
    "in_channels": 3,
    "patch_size": 14,
    "spatial_merge_size": 2,
    "temporal_patch_size": 2,
    "hidden_act": "quick_gelu",
}
COLQWEN2_MAX_VISUAL_TOKENS = 768  # vidore/colqwen2-v1.0 training setting

# google/paligemma-3b-pt-448, the base of vidore/colpali-v1.2.
PALIGEMMA_448_TEXT: dict[str, Any] = {
    "model_type": "gemma",
    "vocab_size": 257216,
    "hidden_size": 2048,
    "intermediate_size": 16384,
    "num_hidden_layers": 18,
    "num_attention_heads": 8,
    "num_key_value_heads": 1,
    "head_dim": 256,
    "hidden_activation": "gelu_pytorch_tanh",
    "max_position_embeddings": 8192,
    "rms_norm_eps": 1e-6,
    "num_image_tokens": 1024,
}
PALIGEMMA_448_VISION: dict[str, Any] = {
    "model_type": "siglip_vision_model",
    "hidden_size": 1152,
    "intermediate_size": 4304,
    "num_hidden_layers": 27,
    "num_attention_heads": 16,
    "patch_size": 14,
    "image_size": 448,
    "projection_dim": 2048,
    "vision_use_head": False,
}
PALIGEMMA_IMAGE_SIZE = 448


def build_full_size(family: str, device: torch.device) -> EmbeddingModel:
    """A full-size model with random weights, built in bf16 straight on the device."""
    from colpali_engine.models import ColPali, ColQwen2
    from transformers import PaliGemmaConfig
    from transformers.models.qwen2_vl import Qwen2VLConfig

    settings = ModelSettings(family=family)  # type: ignore[arg-type]
    attn = resolve_attn_implementation(settings, device)
    torch.manual_seed(0)
    if family == "colqwen2":
        processor = build_colqwen2_processor(COLQWEN2_MAX_VISUAL_TOKENS)
        text = dict(QWEN2_VL_2B_TEXT)
        head_dim = text["hidden_size"] // text["num_attention_heads"]
        assert text["rope_parameters"]["mrope_section"] == mrope_section(head_dim)
        config: Any = Qwen2VLConfig(
            text_config=text,
            vision_config=dict(QWEN2_VL_2B_VISION),
            tie_word_embeddings=True,
            # Ids from the stand-in tokenizer; the real vocabulary size stays.
            **qwen2_vl_token_ids(processor),
        )
        with torch.device(device):
            model = ColQwen2._from_config(config, dtype=torch.bfloat16, attn_implementation=attn)
        name, max_tokens = "Qwen2-VL-2B config (random weights)", COLQWEN2_MAX_VISUAL_TOKENS
    else:
        processor = build_colpali_processor(PALIGEMMA_IMAGE_SIZE)
        config = PaliGemmaConfig(
            text_config=dict(PALIGEMMA_448_TEXT),
            vision_config=dict(PALIGEMMA_448_VISION),
            image_token_index=processor.image_token_id,
            vocab_size=PALIGEMMA_448_TEXT["vocab_size"],
            projection_dim=2048,
            hidden_size=2048,
        )
        with torch.device(device):
            model = ColPali._from_config(config, dtype=torch.bfloat16, attn_implementation=attn)
        name, max_tokens = "PaliGemma-3B-448 config (random weights)", None
    model.eval()
    return EmbeddingModel(
        family=family,
        model_name=name,
        is_random_weights=True,
        dim=int(model.dim),
        device=device,
        dtype=torch.bfloat16,
        model=model,
        processor=processor,
        max_visual_tokens=max_tokens,
    )


def load_small(family: str) -> tuple[EmbeddingModel, RenderTarget]:
    path = ensure_tiny_checkpoint(family, REPO / ".colstream" / "models")
    settings = ModelSettings(family=family, name_or_path=str(path), device="cpu")  # type: ignore[arg-type]
    return load_model(settings), render_target_for(settings)


# -- FLOPs from the configuration --------------------------------------------------
# Matmul FLOPs only (2 per multiply-add); norms, activations and softmax are noise
# next to them. Attention is counted as full (QK^T and AV over the whole sequence).


def _transformer_layer_flops(
    tokens: int, hidden: int, q_dim: int, kv_dim: int, mlp_hidden: int, gated: bool, attn_len: int
) -> float:
    projections = 2 * tokens * hidden * (q_dim + 2 * kv_dim) + 2 * tokens * q_dim * hidden
    attention = 2 * 2 * tokens * attn_len * q_dim
    mlp = (3 if gated else 2) * 2 * tokens * hidden * mlp_hidden
    return projections + attention + mlp


def colqwen2_flops_per_page(config: Any, grid_h: int, grid_w: int, text_tokens: int) -> float:
    """grid_h x grid_w: the page's 14 px patch grid; text_tokens: prompt tokens besides the image."""
    vision, text = config.vision_config, config.text_config
    patches = grid_h * grid_w  # one temporal slice for a still image
    d = vision.embed_dim
    patch_in = vision.in_channels * vision.temporal_patch_size * vision.patch_size**2
    total = 2 * patches * patch_in * d
    total += vision.depth * _transformer_layer_flops(
        patches, d, d, d, d * vision.mlp_ratio, gated=False, attn_len=patches
    )
    merge = vision.spatial_merge_size**2
    merged = patches // merge
    total += 2 * merged * (d * merge) * (d * merge) + 2 * merged * (d * merge) * vision.hidden_size
    seq = merged + text_tokens
    head_dim = text.hidden_size // text.num_attention_heads
    total += text.num_hidden_layers * _transformer_layer_flops(
        seq,
        text.hidden_size,
        text.num_attention_heads * head_dim,
        text.num_key_value_heads * head_dim,
        text.intermediate_size,
        gated=True,
        attn_len=seq,
    )
    total += 2 * seq * text.hidden_size * 128  # custom_text_proj
    return float(total)


def colpali_flops_per_page(config: Any, seq_len: int, logits_kept: int = 1) -> float:
    vision, text = config.vision_config, config.text_config
    patches = (vision.image_size // vision.patch_size) ** 2
    d = vision.hidden_size
    total = 2 * patches * (vision.num_channels * vision.patch_size**2) * d
    total += vision.num_hidden_layers * _transformer_layer_flops(
        patches, d, d, d, vision.intermediate_size, gated=False, attn_len=patches
    )
    total += 2 * patches * d * config.projection_dim
    total += text.num_hidden_layers * _transformer_layer_flops(
        seq_len,
        text.hidden_size,
        text.num_attention_heads * text.head_dim,
        text.num_key_value_heads * text.head_dim,
        text.intermediate_size,
        gated=True,
        attn_len=seq_len,
    )
    total += 2 * logits_kept * text.hidden_size * text.vocab_size  # lm_head
    total += 2 * seq_len * text.hidden_size * 128  # custom_text_proj
    return float(total)


def flops_for_pages(model: EmbeddingModel, sizes: list[tuple[int, int]]) -> list[float]:
    sample = model.preprocess_images([Image.new("RGB", sizes[0], "white")])
    seq_len = int(sample.tensors["attention_mask"][0].sum())
    config = model.model.config
    if model.family == "colpali":
        return [colpali_flops_per_page(config, seq_len)] * len(sizes)
    image_tokens = int((sample.tensors["input_ids"][0] == config.image_token_id).sum())
    text_tokens = seq_len - image_tokens
    flops = []
    for width, height in sizes:
        grid = model.patch_grid(width, height)
        if grid is None:
            raise ValueError(f"page size {width}x{height} cannot be preprocessed")
        flops.append(colqwen2_flops_per_page(config, grid[0], grid[1], text_tokens))
    return flops


# -- pages ---------------------------------------------------------------------------


def page_size_for(target: RenderTarget, landscape: bool) -> tuple[int, int]:
    """The (width, height) the splitter would render an A4 page at for this target."""
    aspect = A4_ASPECT
    if target.max_pixels:
        short = int(math.sqrt(target.max_pixels / aspect))
    elif target.min_side:
        short = target.min_side
    else:
        short = 1024
    long_side = int(short * aspect)
    return (long_side, short) if landscape else (short, long_side)


def make_pages(target: RenderTarget, count: int, unique: int = 32, seed: int = 0) -> list[bytes]:
    """Text pages (title, paragraphs, a table) as JPEG q90, one in eight landscape."""
    rng = np.random.default_rng(seed)
    font = ImageFont.load_default()
    words = ["invoice", "total", "amount", "revenue", "region", "quarter", "contract", "payment", "table"]
    made: list[bytes] = []
    for index in range(min(unique, count)):
        width, height = page_size_for(target, landscape=index % 8 == 7)
        image = Image.new("RGB", (width, height), "white")
        draw = ImageDraw.Draw(image)
        margin = max(8, width // 14)
        line_height = max(9, height // 70)
        draw.text((margin, margin), f"Report {index}: " + " ".join(rng.choice(words, 4)), fill="black", font=font)
        y = margin + 3 * line_height
        while y < height - margin - line_height:
            if rng.random() < 0.08:  # a small table
                for _row in range(4):
                    for col in range(4):
                        x0 = margin + col * (width - 2 * margin) // 4
                        draw.rectangle([x0, y, x0 + (width - 2 * margin) // 4, y + line_height], outline="black")
                        draw.text((x0 + 3, y + 1), f"{rng.integers(0, 99999)}", fill="black", font=font)
                    y += line_height
            else:
                draw.text((margin, y), " ".join(rng.choice(words, 9)), fill=(20, 20, 20), font=font)
                y += line_height
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=90)
        made.append(buffer.getvalue())
    return [made[i % len(made)] for i in range(count)]


# -- measurements ----------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def per_page_loop(model: EmbeddingModel, pages: list[bytes]) -> float:
    """Pages/s of the naive path: decode, process, forward, copy back, one page at a time."""
    _sync(model.device)
    started = time.perf_counter()
    for data in pages:
        image = Image.open(io.BytesIO(data)).convert("RGB")
        [vectors] = model.embed_images([image])
        vectors.astype(np.float16)
    _sync(model.device)
    return len(pages) / (time.perf_counter() - started)


def engine_run(model: EmbeddingModel, pages: list[bytes], batch_size: int, workers: int) -> tuple[float, int]:
    """Pages/s of the production path, with one group per batch all submitted up front
    (as the embedder consumer keeps several micro-batches in flight)."""
    with PipelinedEmbedder(model, max_batch_size=batch_size, queue_depth=2, preprocess_workers=workers) as engine:
        _sync(model.device)
        started = time.perf_counter()
        futures = [
            engine.submit([EmbedItem(i, data) for i, data in enumerate(pages[s : s + batch_size], start=s)])
            for s in range(0, len(pages), batch_size)
        ]
        results = [r for f in futures for r in f.result()]
        _sync(model.device)
        elapsed = time.perf_counter() - started
        failed = [r for r in results if r.vectors is None]
        if failed:
            raise RuntimeError(f"{len(failed)} pages failed, first: {failed[0].error_type}: {failed[0].error}")
        return len(pages) / elapsed, engine.safe_batch_size


@dataclass
class Row:
    model: str
    device: str
    pages: int
    batch_size: int
    engine_pages_s: float
    loop_pages_s: float
    speedup: float
    tflop_per_page: float
    achieved_tflops: float
    peak_tflops: float
    fraction_of_peak: float | None
    bound_pages_s: float
    peak_memory_gib: float | None


def bench_family(family: str, args: argparse.Namespace, cuda: bool) -> Row:
    device = torch.device("cuda" if cuda else "cpu")
    if cuda:
        model = build_full_size(family, device)
        settings = ModelSettings(family=family, max_visual_tokens=COLQWEN2_MAX_VISUAL_TOKENS)  # type: ignore[arg-type]
        target = render_target_for(settings)
    else:
        model, target = load_small(family)
    pages = make_pages(target, args.pages)
    sizes = [Image.open(io.BytesIO(p)).size for p in pages]
    flops = flops_for_pages(model, sizes)
    workers = args.workers or max(2, min(12, (os.cpu_count() or 2) - 2))

    # Warm up kernels, allocator and the processors' thread copies.
    per_page_loop(model, pages[:2])
    engine_run(model, pages[: min(len(pages), 2 * args.batch_sizes[0])], args.batch_sizes[0], workers)

    loop_rate = per_page_loop(model, pages[: args.loop_pages])

    best_batch, best_rate = args.batch_sizes[0], 0.0
    if len(args.batch_sizes) > 1:
        for candidate in args.batch_sizes:
            try:
                rate, safe = engine_run(model, pages[: min(len(pages), 3 * candidate)], candidate, workers)
            except torch.cuda.OutOfMemoryError:
                break
            print(f"  {family}: batch {candidate}: {rate:.1f} pages/s (safe {safe})", file=sys.stderr)
            if rate > best_rate:
                best_batch, best_rate = safe, rate

    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    rate, used_batch = engine_run(model, pages, best_batch, workers)
    peak_memory = torch.cuda.max_memory_allocated(device) / 2**30 if cuda else None

    flop_per_page = float(np.mean(flops))
    achieved = rate * flop_per_page / 1e12
    row = Row(
        model=model.model_name,
        device=torch.cuda.get_device_name(device) if cuda else "cpu",
        pages=len(pages),
        batch_size=used_batch,
        engine_pages_s=rate,
        loop_pages_s=loop_rate,
        speedup=rate / loop_rate,
        tflop_per_page=flop_per_page / 1e12,
        achieved_tflops=achieved,
        peak_tflops=args.peak_tflops,
        fraction_of_peak=achieved / args.peak_tflops if cuda else None,
        bound_pages_s=args.peak_tflops * 1e12 / flop_per_page,
        peak_memory_gib=peak_memory,
    )
    del model
    if cuda:
        torch.cuda.empty_cache()
    return row


def print_table(rows: list[Row]) -> None:
    headers = [
        "model", "batch", "pages", "engine p/s", "loop p/s", "ratio (>=10x)",
        "TFLOP/page", "TFLOP/s", "of peak (>=0.6)", "bound p/s", "peak GiB",
    ]  # fmt: skip
    table = [
        [
            r.model,
            str(r.batch_size),
            str(r.pages),
            f"{r.engine_pages_s:.2f}",
            f"{r.loop_pages_s:.2f}",
            f"{r.speedup:.1f}x",
            f"{r.tflop_per_page:.4g}",
            f"{r.achieved_tflops:.4g}",
            "n/a (CPU)" if r.fraction_of_peak is None else f"{r.fraction_of_peak:.2f}",
            f"{r.bound_pages_s:.4g}",
            "n/a" if r.peak_memory_gib is None else f"{r.peak_memory_gib:.1f}",
        ]
        for r in rows
    ]
    widths = [max(len(h), *(len(row[i]) for row in table)) for i, h in enumerate(headers)]
    print(" | ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)))
    print("-+-".join("-" * w for w in widths))
    for row in table:
        print(" | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer pages")
    parser.add_argument("--family", choices=["colqwen2", "colpali", "both"], default="both")
    parser.add_argument("--pages", type=int, help="pages for the engine run")
    parser.add_argument("--loop-pages", type=int, help="pages for the per-page loop")
    parser.add_argument("--batch-sizes", help="comma-separated candidates; the fastest is used")
    parser.add_argument("--workers", type=int, help="preprocessing threads")
    parser.add_argument("--peak-tflops", type=float, default=800.0, help="dense bf16 peak of the device")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args(argv)
    cuda = torch.cuda.is_available()
    if args.pages is None:
        args.pages = (192 if args.quick else 512) if cuda else (16 if args.quick else 48)
    if args.loop_pages is None:
        args.loop_pages = (16 if args.quick else 32) if cuda else (4 if args.quick else 8)
    if args.batch_sizes is None:
        args.batch_sizes = "16,32,64" if cuda else "4"
    args.batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    args.loop_pages = min(args.loop_pages, args.pages)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cuda = torch.cuda.is_available()
    if cuda:
        print(f"GPU: {torch.cuda.get_device_name(0)}; full-size configurations, random weights, bf16")
    else:
        print("no GPU available: CPU run with small config (tiny random-weights checkpoints, fp32)")
    families = ["colqwen2", "colpali"] if args.family == "both" else [args.family]
    rows = []
    for family in families:
        started = time.perf_counter()
        rows.append(bench_family(family, args, cuda))
        print(f"  {family}: done in {time.perf_counter() - started:.1f}s", file=sys.stderr)
    print_table(rows)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps([asdict(r) for r in rows], indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
