"""Prompt-free segmentation heads on frozen SAM image embeddings.

Every head maps an embedding batch ``(B, C, h, w)`` (LiteMedSAM and SAM: ``C = 256``,
``h = w = 64``) to class logits ``(B, n_classes, S, S)`` in the model-input frame
(``S = model.image_size``: 256 for LiteMedSAM, 1024 for SAM; 256 without a model).
Classes: 0 background, 1 liver, 2 tumour.

Kinds (``build_head(kind, ...)``):

- ``linear``: a 1x1 convolution on the embedding, bilinear upsampling.
- ``cnn``: conv blocks, then a transposed-conv upsampling path to the input frame, with a
  light skip from the slice image at S/2 and (``full_res=True``, the default) a last residual
  refinement block at the full input resolution S fed with the image itself: each token of
  the frozen encoder covers 4x4 input pixels (16x16 for SAM ViT), so edges of small lesions
  need the pixels. On the sample (sparse, K = 8, 200 steps) the full-resolution block lifted
  tumour Dice 0.836 -> 0.873 and liver 0.972 -> 0.979. ``refine_size`` (default S) runs that
  block at a lower resolution, down to S/2 (the demo uses S/2 = 128, the sample's native size:
  a 1.2-1.4x cheaper step at the same Dice; docs/training_speed.md).
- ``vit``: a small transformer over the embedding tokens (2x2-merged), then the cnn path.
- ``autosam``: SAM's mask decoder initialised from the model's checkpoint, prompt tokens
  removed, one mask token (and hypernetwork MLP) per class (after Hu et al. 2023, "How to
  Efficiently Adapt Large Segmentation Model (SAM) to Medical Images"). Without a model a
  randomly initialised decoder of the same shape is built (tests only).

A ``cnn`` head with ``context=c`` (2.5D) reads slices ``z - c .. z + c`` stacked along the
channels; ``tta=True`` (any kind) makes inference average with the left-right flip.
A ``cnn`` head with ``fine_features=F`` also reads a finer encoder stage (LiteMedSAM's TinyViT
``layers.0``: F = 128 channels on a 128 x 128 grid) as ``forward(emb, image=..., fine=...)``,
reduced by a 1x1 conv and merged where the decoder reaches S/2 (docs/heads.md: on the sample,
K = 8, 3 seeds, test tumour Dice +0.018 sparse and +0.10 slab, slab liver -0.010).

Heads that use the image take it as ``forward(emb, image=...)`` where ``image`` is the
windowed slice in the model-input frame, ``(B, 1, S, S)`` in [0, 1]; ``head.uses_image``
says whether it is needed.
"""

from __future__ import annotations

import copy
import math
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from .config import HEAD_KINDS
from .decoder_backends import token_self_attention
from .util import SamliverError

if TYPE_CHECKING:  # pragma: no cover
    from .models import SamModel


def _gn(channels: int) -> nn.GroupNorm:
    # GroupNorm, not BatchNorm: batches of a few slices make batch statistics noisy.
    return nn.GroupNorm(min(8, channels), channels)


class _ImageSkip(nn.Module):
    """A few convolutions on the slice image at full resolution (the 'light skip')."""

    def __init__(self, out_ch: int = 16) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(1, out_ch, 3, padding=1), _gn(out_ch), nn.GELU(),
            nn.Conv2d(out_ch, out_ch, 3, padding=1), _gn(out_ch), nn.GELU(),
        )

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.net(image)


def _resize(x: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinear resize of a square map to ``size`` (no-op when it already is)."""
    if x.shape[-1] == size:
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)


class _UpPath(nn.Module):
    """Upsampling from the embedding grid to the model-input frame ``S``.

    One transposed conv (64 -> 128 for LiteMedSAM), fused there with the image skip at S/2,
    then bilinear to S: full-resolution convolutions cost ~4x more on a CPU for no gain on
    slices whose native size is <= S/2 (the sample is 128x128).
    """

    def __init__(self, in_ch: int, n_classes: int, out_size: int, embed_hw: int = 64,
                 use_image: bool = True, width: int = 32, full_res: bool = False,
                 refine_size: int | None = None, fine_ch: int = 0) -> None:
        super().__init__()
        self.out_size = out_size
        self.mid_size = max(embed_hw, out_size // 2)
        # Optional last block: logits + the image at ``refine_size`` (default S, the full
        # input resolution), a residual refinement (lesion edges finer than S/2 pixels). At
        # S/2 it costs a quarter (the refined logits are then upsampled bilinearly).
        # Clamped to [S/2, S]: a recipe's 128 px (LiteMedSAM's S/2) means S/2 for SAM's S = 1024.
        self.refine_size = (min(max(int(refine_size), self.mid_size), out_size) if refine_size
                            else out_size)
        self.full = (nn.Sequential(nn.Conv2d(n_classes + 1, 16, 3, padding=1), _gn(16),
                                   nn.GELU(), nn.Conv2d(16, n_classes, 3, padding=1))
                     if full_res and use_image and out_size > self.mid_size
                     else None)
        if self.full is not None:  # start as the identity: the refinement is learned on top
            nn.init.zeros_(self.full[-1].weight)
            nn.init.zeros_(self.full[-1].bias)
        self.use_image = use_image
        self.up = nn.Sequential(nn.ConvTranspose2d(in_ch, width, 2, stride=2), _gn(width), nn.GELU())
        skip_ch = 16 if use_image else 0
        self.skip = _ImageSkip(skip_ch) if use_image else None
        # fine_ch: reduced finer-encoder-stage features concatenated at S/2 (CNNHead's
        # fine_features), beside the transposed-conv output and the image skip.
        self.fuse = nn.Sequential(
            nn.Conv2d(width + skip_ch + fine_ch, 32, 3, padding=1), _gn(32), nn.GELU(),
            nn.Conv2d(32, n_classes, 1),
        )

    def forward(self, x: torch.Tensor, image: torch.Tensor | None,
                fine: torch.Tensor | None = None) -> torch.Tensor:
        full_image = image if image is not None and image.shape[-1] == self.out_size else None
        if full_image is not None and self.refine_size != self.out_size:
            full_image = F.interpolate(full_image, size=(self.refine_size,) * 2, mode="area")
        x = self.up(x)
        if x.shape[-1] != self.mid_size:
            x = F.interpolate(x, size=(self.mid_size, self.mid_size), mode="bilinear",
                              align_corners=False)
        if self.skip is not None:
            if image is None:
                raise SamliverError("This head uses the slice image as a skip input: pass image=.")
            if image.shape[-1] != self.mid_size:
                image = F.interpolate(image, size=(self.mid_size, self.mid_size),
                                      mode="area")
            x = torch.cat([x, self.skip(image)], dim=1)
        if fine is not None:
            x = torch.cat([x, _resize(fine, self.mid_size)], dim=1)
        x = self.fuse(x)
        if self.full is not None and full_image is not None:
            x = _resize(x, self.refine_size)
            x = x + self.full(torch.cat([x, full_image], dim=1))
        return _resize(x, self.out_size)


class Head(nn.Module):
    """Base class of the prompt-free heads: what every head is and says about itself.

    Attributes:
        kind: ``"linear"``, ``"cnn"``, ``"vit"`` or ``"autosam"`` (a class attribute).
        embed_dim: embedding channels it reads (256 for SAM and LiteMedSAM).
        embed_hw: side of the embedding grid (64).
        n_classes: output classes (3: background, liver, tumour).
        out_size: side of the output logits, the model-input frame (256 LiteMedSAM, 1024 SAM).
        uses_image: whether ``forward`` needs the windowed slice image.
        options: constructor options a checkpoint stores to rebuild the head (set by
            :func:`build_head`).
        checkpoint_info: what the checkpoint it was loaded from records (model, window,
            config, history), or None for a head that was not loaded.
    """

    kind: str = ""

    def __init__(self, embed_dim: int, n_classes: int, out_size: int, embed_hw: int = 64,
                 uses_image: bool = False) -> None:
        super().__init__()
        self.embed_dim = int(embed_dim)
        self.n_classes = int(n_classes)
        self.out_size = int(out_size)
        self.embed_hw = int(embed_hw)
        self.uses_image = bool(uses_image)
        self.options: dict = {}
        self.checkpoint_info: dict | None = None

    def forward(self, emb: torch.Tensor, image: torch.Tensor | None = None) -> torch.Tensor:
        """Class logits ``(B, n_classes, out_size, out_size)`` for embeddings ``(B, C, h, w)``.

        Args:
            emb: a batch of frozen-encoder embeddings.
            image: ``(B, 1, S, S)`` windowed slices in [0, 1], for heads with ``uses_image``.
        """
        raise NotImplementedError


class LinearHead(Head):
    """1x1 conv on the embedding; logits upsampled bilinearly to ``out_size``."""

    kind = "linear"

    def __init__(self, embed_dim: int = 256, n_classes: int = 3, out_size: int = 256,
                 embed_hw: int = 64) -> None:
        super().__init__(embed_dim, n_classes, out_size, embed_hw, uses_image=False)
        self.conv = nn.Conv2d(embed_dim, n_classes, 1)

    def forward(self, emb: torch.Tensor, image: torch.Tensor | None = None) -> torch.Tensor:
        return F.interpolate(self.conv(emb), size=(self.out_size, self.out_size),
                             mode="bilinear", align_corners=False)


class CNNHead(Head):
    """Conv blocks on the embedding + transposed-conv upsampling (+ image skip).

    ``context`` (default 0) > 0 makes it a 2.5D head: its input is the embeddings of slices
    ``z - context .. z + context`` stacked along the channels (``(B, (2 context + 1) C, h, w)``,
    centre in the middle; :func:`samliver.training_data.slice_tensors` with ``context=``). The
    neighbours go through one shared 1x1 reduction to ``context_width`` channels, then a 1x1
    mix that is added to the centre's reduced features before the 3x3 blocks; the mix starts
    at zero, so at step 0 the head is the 2D head.

    ``fine_features`` (default 0: none) > 0 adds a finer encoder stage, ``(B, fine_features,
    h', w')`` passed as ``forward(..., fine=)`` (LiteMedSAM: TinyViT ``layers.0``, 128 x 128 x
    128): a 1x1 conv to ``fine_width`` channels, GroupNorm, GELU, concatenated at S/2 with the
    upsampled embedding path and the image skip (the refinement block follows). Encoder
    features at 2 pixels per cell, not 4: on the sample (K = 8, 3 seeds) test tumour Dice
    +0.018 sparse and +0.10 slab, liver +0.003 sparse and -0.010 slab (docs/heads.md).
    """

    kind = "cnn"

    def __init__(self, embed_dim: int = 256, n_classes: int = 3, out_size: int = 256,
                 width: int = 128, depth: int = 1, use_image: bool = True,
                 dropout: float = 0.1, embed_hw: int = 64, full_res: bool = True,
                 refine_size: int | None = None, context: int = 0,
                 context_width: int = 32, fine_features: int = 0, fine_width: int = 32) -> None:
        super().__init__(embed_dim, n_classes, out_size, embed_hw, uses_image=use_image)
        if context < 0:
            raise SamliverError(f"context must be >= 0 slices, got {context}.")
        if fine_features < 0:
            raise SamliverError(f"fine_features must be >= 0 channels, got {fine_features}.")
        self.context = int(context)
        self.fine_features = int(fine_features)
        self.fine = (nn.Sequential(nn.Conv2d(self.fine_features, fine_width, 1), _gn(fine_width),
                                   nn.GELU())
                     if self.fine_features else None)
        # 1x1 reduction first: a 3x3 conv on all 256 channels is most of the cost on a CPU.
        blocks: list[nn.Module] = [nn.Dropout2d(dropout)] if dropout else []
        blocks += [nn.Conv2d(embed_dim, width, 1), _gn(width), nn.GELU()]
        for _ in range(depth):
            blocks += [nn.Conv2d(width, width, 3, padding=1), _gn(width), nn.GELU()]
        self.body = nn.Sequential(*blocks)
        self._reduce_at = 2 if dropout else 1  # body[:_reduce_at] = (dropout,) 1x1 reduction
        if self.context:
            n_nb = 2 * self.context
            # Shared over the neighbours (one 256 -> 32 conv, not 2c of them): cheap, and the
            # same features whichever side a neighbour lies on.
            self.ctx_reduce = nn.Sequential(nn.Conv2d(embed_dim, context_width, 1), nn.GELU())
            self.ctx_mix = nn.Conv2d(n_nb * context_width, width, 1)
            nn.init.zeros_(self.ctx_mix.weight)
            nn.init.zeros_(self.ctx_mix.bias)
        self.up = _UpPath(width, n_classes, out_size, embed_hw=embed_hw, use_image=use_image,
                          width=32, full_res=full_res, refine_size=refine_size,
                          fine_ch=fine_width if self.fine_features else 0)

    def _fine(self, fine: torch.Tensor | None) -> torch.Tensor | None:
        if self.fine is None:
            return None
        if fine is None or fine.shape[1] != self.fine_features:
            got = "none" if fine is None else f"{fine.shape[1]} channels"
            raise SamliverError(
                f"This head reads {self.fine_features} channels of a finer encoder stage "
                f"(fine_features), got {got}: pass fine= (embeddings.embed_fine_features).")
        return self.fine(fine)

    def forward(self, emb: torch.Tensor, image: torch.Tensor | None = None,
                fine: torch.Tensor | None = None) -> torch.Tensor:
        if not self.context:
            return self.up(self.body(emb), image, self._fine(fine))
        n = 2 * self.context + 1
        b, c, h, w = emb.shape
        if c != n * self.embed_dim:
            raise SamliverError(
                f"This head reads {n} stacked slices ({n * self.embed_dim} channels), got {c}: "
                f"gather the neighbours with slice_tensors(..., context={self.context}).")
        stack = emb.view(b, n, self.embed_dim, h, w)
        centre = stack[:, self.context]
        neighbours = torch.cat([stack[:, :self.context], stack[:, self.context + 1:]], dim=1)
        drop = self.body[0] if self._reduce_at == 2 else nn.Identity()
        nb = self.ctx_reduce(drop(neighbours.reshape(b * (n - 1), self.embed_dim, h, w)))
        x = self.body[:self._reduce_at](centre) + self.ctx_mix(nb.reshape(b, -1, h, w))
        return self.up(self.body[self._reduce_at:](x), image, self._fine(fine))


class ViTHead(Head):
    """A small transformer over 2x2-merged embedding tokens, then the cnn upsampling path."""

    kind = "vit"

    def __init__(self, embed_dim: int = 256, n_classes: int = 3, out_size: int = 256,
                 dim: int = 128, depth: int = 2, heads: int = 4, embed_hw: int = 64,
                 use_image: bool = True) -> None:
        super().__init__(embed_dim, n_classes, out_size, embed_hw, uses_image=use_image)
        # 2x2 patch merge keeps attention at 32x32 = 1024 tokens: affordable on a CPU.
        self.merge = nn.Conv2d(embed_dim, dim, 2, stride=2)
        grid = max(embed_hw // 2, 1)
        self.pos = nn.Parameter(torch.zeros(1, grid * grid, dim))
        nn.init.trunc_normal_(self.pos, std=0.02)
        layer = nn.TransformerEncoderLayer(dim, heads, dim * 2, dropout=0.1,
                                           activation="gelu", batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.unmerge = nn.ConvTranspose2d(dim, dim, 2, stride=2)
        self.up = _UpPath(dim, n_classes, out_size, embed_hw=embed_hw, use_image=use_image,
                          width=32)

    def forward(self, emb: torch.Tensor, image: torch.Tensor | None = None) -> torch.Tensor:
        x = self.merge(emb)
        b, c, h, w = x.shape
        tokens = x.flatten(2).transpose(1, 2)
        pos = self.pos
        if pos.shape[1] != h * w:  # another grid size: interpolate the position table
            g = int(math.sqrt(pos.shape[1]))
            pos = F.interpolate(pos.transpose(1, 2).reshape(1, c, g, g), size=(h, w),
                                mode="bilinear", align_corners=False).flatten(2).transpose(1, 2)
        tokens = self.norm(self.blocks(tokens + pos))
        x = self.unmerge(tokens.transpose(1, 2).reshape(b, c, h, w))
        return self.up(x, image)


def _random_sam_parts(embed_dim: int, embed_hw: int, depth: int = 2,
                      mlp_dim: int | None = None) -> tuple[nn.Module, nn.Module]:
    """A randomly initialised SAM mask decoder + prompt encoder (tests / no model).

    Defaults: SAM's decoder shape (2 layers, MLP 8x the width).
    """
    from .models import build_mask_decoder

    prompt, decoder = build_mask_decoder(embed_dim, embed_hw, depth=depth, mlp_dim=mlp_dim)
    return decoder, prompt



# -- AutoSAM's decoder, computed without layout copies ------------------------------------------
# The same math as segment_anything's TwoWayTransformer / Attention / output_upscaling, reading
# the same modules' parameters (the vendored modules keep their own forward for the prompted
# predictor). A profile of one bf16 training step (batch 8) found most of the time outside the
# matmuls: NCHW <-> token permutes, additions to transposed (strided) position encodings,
# LayerNorm2d as five element-wise passes, attention's head split/merge copies, and the
# transposed convolutions' backward and a GELU backward on mixed memory layouts. Here the image
# side stays in one contiguous token layout (B, h*w, C) from the embedding to the logits.


def _amp(x: torch.Tensor) -> torch.Tensor:
    """``x`` cast once to the autocast dtype when autocast is on (what each matmul would do)."""
    dev = x.device.type
    if torch.is_autocast_enabled(dev):
        return x.to(torch.get_autocast_dtype(dev))
    return x


def _per_head(attn: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``(B, T, C')`` projected tokens -> ``(B, T, heads, C' / heads)`` (a view)."""
    return x.unflatten(-1, (attn.num_heads, -1))


def _token_to_image(attn: nn.Module, q: torch.Tensor, k: torch.Tensor,
                    v: torch.Tensor) -> torch.Tensor:
    """``Attention(q=tokens, k=image, v=image)`` for T tokens and N image tokens.

    softmax(q_proj(q) k_proj(k)^T / sqrt(d)) v_proj(v) per head, reassociated: the T query
    rows are folded into ``k_proj``'s weight (``(C, heads * T)``, tiny), so the N x C image
    tokens meet one ``C -> heads * T`` matmul instead of two ``C -> C'`` projections; the value
    projection is applied after the weighted sum over the image (the weights sum to 1, so the
    value bias passes through). Same function; only the rounding differs.
    """
    b, t, _ = q.shape
    n_heads = attn.num_heads
    qh = _per_head(attn, attn.q_proj(q))                                 # (B, T, H, d)
    scale = qh.shape[-1] ** -0.5
    wk = attn.k_proj.weight.unflatten(0, (n_heads, -1))                  # (H, d, C)
    qk = torch.einsum("bthd,hdc->bhtc", qh, wk).flatten(1, 2) * scale     # (B, H*T, C)
    qb = torch.einsum("bthd,hd->bht", qh, attn.k_proj.bias.view(n_heads, -1)).flatten(1, 2)
    scores = torch.baddbmm(qb[..., None] * scale, qk, k.transpose(1, 2))  # (B, H*T, N)
    ctx = torch.bmm(scores.softmax(-1).to(v.dtype), v)                   # (B, H*T, C)
    wv = attn.v_proj.weight.unflatten(0, (n_heads, -1))                  # (H, d, C)
    out = torch.einsum("bhtc,hdc->bthd", ctx.unflatten(1, (n_heads, t)), wv).flatten(2)
    return attn.out_proj(out + attn.v_proj.bias)


def _image_to_token(attn: nn.Module, q: torch.Tensor, k: torch.Tensor,
                    v: torch.Tensor) -> torch.Tensor:
    """``Attention(q=image, k=tokens, v=tokens)`` for N image tokens and T tokens.

    Reassociated like :func:`_token_to_image`: the T keys are folded into ``q_proj``'s weight
    and the T values into ``out_proj``'s, so the N x C image tokens meet a ``C -> heads * T``
    matmul and a ``heads * T -> C`` one, not the ``C -> C' -> C`` projections.
    """
    b, n, _ = q.shape
    n_heads = attn.num_heads
    kh = _per_head(attn, attn.k_proj(k))                                 # (B, T, H, d)
    vh = _per_head(attn, attn.v_proj(v))
    t = kh.shape[1]
    scale = kh.shape[-1] ** -0.5
    wq = attn.q_proj.weight.unflatten(0, (n_heads, -1))                  # (H, d, C)
    qk = torch.einsum("bthd,hdc->bcht", kh, wq).flatten(2) * scale       # (B, C, H*T)
    qb = torch.einsum("bthd,hd->bht", kh, attn.q_proj.bias.view(n_heads, -1)).flatten(1) * scale
    scores = torch.baddbmm(qb[:, None], q, qk)                           # (B, N, H*T)
    probs = scores.unflatten(-1, (n_heads, t)).softmax(-1).flatten(2)
    wo = attn.out_proj.weight.unflatten(1, (n_heads, -1))                # (C, H, d)
    vo = torch.einsum("bthd,chd->bhtc", vh, wo).flatten(1, 2)            # (B, H*T, C)
    return torch.baddbmm(attn.out_proj.bias.to(vo.dtype), probs.to(vo.dtype), vo)


def _two_way(tf: nn.Module, keys: torch.Tensor, key_pe: torch.Tensor,
             point_embedding: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``TwoWayTransformer.forward`` on image tokens ``keys`` ``(B, N, C)`` (contiguous).

    ``key_pe`` ``(1, N, C)`` contiguous. The token side (a few tokens) runs the modules' code;
    the image side, the cost, runs :func:`_token_to_image` / :func:`_image_to_token`, with
    ``keys + key_pe`` formed (and cast for autocast) once per layer where the module forms the
    same sum twice.
    """
    queries = point_embedding
    for layer in tf.layers:
        queries = token_self_attention(layer, queries, point_embedding)
        k = _amp(keys + key_pe)
        q = queries + point_embedding
        queries = layer.norm2(queries + _token_to_image(layer.cross_attn_token_to_image, q, k,
                                                        _amp(keys)))
        queries = layer.norm3(queries + layer.mlp(queries))
        q = queries + point_embedding
        keys = layer.norm4(keys + _image_to_token(layer.cross_attn_image_to_token, k, q, queries))
    q = queries + point_embedding
    attn_out = _token_to_image(tf.final_attn_token_to_image, q, _amp(keys + key_pe), _amp(keys))
    return tf.norm_final_attn(queries + attn_out), keys


def _is_2x2_up(m: nn.Module) -> bool:
    return (isinstance(m, nn.ConvTranspose2d) and tuple(m.kernel_size) == (2, 2)
            and tuple(m.stride) == (2, 2) and tuple(m.padding) == (0, 0) and m.groups == 1
            and tuple(m.dilation) == (1, 1) and tuple(m.output_padding) == (0, 0))


def _fusable_upscaling(up: nn.Module) -> bool:
    """Whether ``up`` is SAM's ``output_upscaling`` (2x2 up, LayerNorm2d, act, 2x2 up, act)."""
    return (isinstance(up, nn.Sequential) and len(up) == 5 and _is_2x2_up(up[0])
            and _is_2x2_up(up[3]) and type(up[1]).__name__ == "LayerNorm2d"
            and all(hasattr(up[1], a) for a in ("weight", "bias", "eps")))


def _up_2x2(conv: nn.ConvTranspose2d, x: torch.Tensor) -> torch.Tensor:
    """A 2x2 / stride-2 transposed conv on channels-last ``(..., C_in)`` as one matmul.

    Each input pixel maps to its own 2 x 2 output pixels: ``(..., C_in)`` -> ``(..., 2, 2,
    C_out)`` (sub-pixel row, column, channel), the output pixels left in that order until the end.
    """
    w = conv.weight  # (C_in, C_out, 2, 2)
    out = w.shape[1]
    y = F.linear(x, w.permute(2, 3, 1, 0).reshape(4 * out, w.shape[0]), conv.bias.repeat(4))
    return y.unflatten(-1, (2, 2, out))


def _upscaled_logits(up: nn.Sequential, tokens: torch.Tensor, hyper: torch.Tensor,
                     h: int, w: int) -> torch.Tensor:
    """``hyper @ output_upscaling(tokens as B x C x h x w)`` -> ``(B, K, 4h, 4w)``.

    ``tokens`` ``(B, h*w, C)``, ``hyper`` ``(B, K, C / 8)``. LayerNorm2d normalises over the
    channels, which are the last (contiguous) dim here, so it is one ``F.layer_norm``; the
    upscaled features stay in sub-pixel order and only the K-channel logits are reordered.
    """
    b = tokens.shape[0]
    ln = up[1]
    x = _up_2x2(up[0], tokens.view(b, h, w, -1))            # (B, h, w, 2, 2, C/4)
    # In float32 even under autocast: on a bf16 input, the CPU layer_norm backward sums the
    # weight / bias gradients over the B*4h*4w rows inaccurately (~25 % off measured, ~100 % on
    # the real head), where LayerNorm2d's element-wise ops under autocast were within 0.6 %.
    wide = x.to(torch.promote_types(x.dtype, torch.float32))
    x = up[2](F.layer_norm(wide, (x.shape[-1],), ln.weight, ln.bias, ln.eps).to(x.dtype))
    x = up[4](_up_2x2(up[3], x))                             # (B, h, w, 2, 2, 2, 2, C/8)
    logits = torch.matmul(x.reshape(b, -1, x.shape[-1]), hyper.transpose(1, 2))
    k = hyper.shape[1]
    # (B, h, w, a, c, a2, c2, K) -> (B, K, h, a, a2, w, c, c2): pixel (4i + 2a + a2, 4j + 2c + c2)
    return (logits.view(b, h, w, 2, 2, 2, 2, k).permute(0, 7, 1, 3, 5, 2, 4, 6)
            .reshape(b, k, 4 * h, 4 * w))


class AutoSAMHead(Head):
    """SAM's mask decoder without prompts: one learned mask token + hypernetwork per class.

    The transformer, upscaling path and the 'no mask' dense embedding come from the
    checkpoint; class ``k``'s token and hypernetwork MLP start from the decoder's single-mask
    output (token 0), so at step 0 every class predicts what SAM predicts without a prompt.
    ``train_parts`` picks what learns: ``"all"`` (default), ``"tokens"`` (tokens + MLPs +
    upscaling) or ``"transformer"`` (all but the upscaling path). Without a model,
    ``decoder_depth`` / ``decoder_mlp_dim`` shape the random decoder (default SAM's: 2, 8x).
    """

    kind = "autosam"

    def __init__(self, embed_dim: int = 256, n_classes: int = 3, out_size: int = 256,
                 model: SamModel | None = None, embed_hw: int = 64, use_image: bool = True,
                 train_parts: str = "all", decoder_depth: int = 2,
                 decoder_mlp_dim: int | None = None, refine_size: int | None = None) -> None:
        super().__init__(embed_dim, n_classes, out_size, embed_hw, uses_image=use_image)
        # The refinement block (logits + image skip) at ``refine_size`` instead of S: at S/2 it
        # costs a quarter, as in the cnn head (the sample's slices are S/2 = 128 px anyway).
        # Clamped to [S/2, S], as in the cnn head (a recipe's 128 px is S/2 for S = 1024 too).
        self.refine_size = (min(max(int(refine_size), out_size // 2), out_size) if refine_size
                            else out_size)
        if model is not None:
            decoder = copy.deepcopy(model.mask_decoder).float()
            prompt = model.prompt_encoder
        else:
            decoder, prompt = _random_sam_parts(embed_dim, embed_hw, decoder_depth,
                                                decoder_mlp_dim)
        dim = decoder.transformer_dim
        self.transformer = decoder.transformer
        self.output_upscaling = decoder.output_upscaling
        base_token = decoder.mask_tokens.weight[0].detach().clone()
        self.class_tokens = nn.Parameter(
            base_token[None].repeat(n_classes, 1) + 0.02 * torch.randn(n_classes, dim))
        self.hyper_mlps = nn.ModuleList(
            [copy.deepcopy(decoder.output_hypernetworks_mlps[0]) for _ in range(n_classes)])
        with torch.no_grad():
            pe = prompt.get_dense_pe().detach().float().clone()
            no_mask = prompt.no_mask_embed.weight.detach().float().clone()
        if pe.shape[-1] != embed_hw:
            pe = F.interpolate(pe, size=(embed_hw, embed_hw), mode="bilinear", align_corners=False)
        self.register_buffer("image_pe", pe, persistent=True)
        self.dense = nn.Parameter(no_mask.reshape(1, dim, 1, 1))
        # Per-class bias: SAM's mask logits are calibrated for one foreground mask; a learned
        # offset lets background / liver / tumour start from sensible priors.
        self.class_bias = nn.Parameter(torch.zeros(1, n_classes, 1, 1))
        mask_ch = dim // 8
        self.skip = _ImageSkip(16) if use_image else None
        self.refine = (nn.Sequential(nn.Conv2d(n_classes + 16, 32, 3, padding=1), _gn(32),
                                     nn.GELU(), nn.Conv2d(32, n_classes, 1))
                       if use_image else None)
        self._mask_ch = mask_ch
        self.set_train_parts(train_parts)

    def set_train_parts(self, parts: str = "all") -> None:
        """Freeze decoder parts: ``all`` | ``tokens`` | ``transformer``."""
        if parts not in ("all", "tokens", "transformer"):
            raise SamliverError(f"train_parts must be all, tokens or transformer, not {parts!r}.")
        self.train_parts = parts
        for p in self.transformer.parameters():
            p.requires_grad_(parts in ("all", "transformer"))
        for p in self.output_upscaling.parameters():
            p.requires_grad_(parts in ("all", "tokens"))

    def forward(self, emb: torch.Tensor, image: torch.Tensor | None = None) -> torch.Tensor:
        b, c, h, w = emb.shape
        tokens = self.class_tokens[None].expand(b, -1, -1)
        pos = self.image_pe
        if pos.shape[-2:] != emb.shape[-2:]:
            pos = F.interpolate(pos, size=emb.shape[-2:], mode="bilinear", align_corners=False)
        # Image tokens (B, h*w, C) contiguous, made once: the module's flatten/permute views
        # made every later addition and projection read transposed memory.
        src = emb.flatten(2).transpose(1, 2).contiguous() + self.dense.view(1, 1, c)
        hs, src = _two_way(self.transformer, src, pos.flatten(2).transpose(1, 2).contiguous(), tokens)
        hyper = torch.stack([mlp(hs[:, i]) for i, mlp in enumerate(self.hyper_mlps)], dim=1)
        if _fusable_upscaling(self.output_upscaling):
            logits = _upscaled_logits(self.output_upscaling, src, hyper, h, w)
        else:  # another upscaling path: the module's own forward
            up = self.output_upscaling(src.transpose(1, 2).reshape(b, c, h, w))
            bb, cc, hh, ww = up.shape
            logits = (hyper @ up.view(bb, cc, hh * ww)).view(bb, -1, hh, ww)
        logits = logits + self.class_bias
        hh = logits.shape[-1]
        if hh != self.out_size:
            logits = F.interpolate(logits, size=(self.out_size, self.out_size), mode="bilinear",
                                   align_corners=False)
        if self.refine is not None:
            if image is None:
                raise SamliverError("This head uses the slice image as a skip input: pass image=.")
            size = self.refine_size
            if image.shape[-1] != size:
                image = F.interpolate(image, size=(size, size), mode="area"
                                      if image.shape[-1] > size else "bilinear")
            small = logits if size == self.out_size else F.interpolate(
                logits, size=(size, size), mode="area")
            logits = logits + _resize(self.refine(torch.cat([small, self.skip(image)], dim=1)),
                                      self.out_size)
        return logits


def build_head(kind: str, embed_dim: int = 256, n_classes: int = 3, model: SamModel | None = None,
               **options: Any) -> Head:
    """Build a head of ``kind`` (linear | cnn | vit | autosam).

    ``model`` (a ``samliver.models.SamModel``) sets the embedding size, grid and output frame
    (its ``embed_dim``, ``embed_hw``, ``image_size``) and, for ``autosam``, supplies the
    pretrained mask decoder. Without a model: ``embed_dim`` channels on a 64x64 grid,
    256x256 output. ``options`` go to the head class (e.g. ``use_image=False``, ``width``,
    ``depth``, ``train_parts``). The returned module has ``.kind``, ``.uses_image`` and
    ``.options`` (what a checkpoint stores to rebuild it).

    Args:
        kind: one of :data:`samliver.config.HEAD_KINDS`.
        embed_dim: embedding channels when no ``model`` is given.
        n_classes: output classes (3: background, liver, tumour).
        model: the model whose embeddings the head reads (recommended).
        **options: head-specific options.

    Returns:
        An untrained :class:`Head`.

    Raises:
        SamliverError: an unknown kind, or an embedding size the kind cannot take.
    """
    if kind not in HEAD_KINDS:
        raise SamliverError(f"Unknown head kind {kind!r}; choose one of {', '.join(HEAD_KINDS)}.")
    embed_hw = int(options.pop("embed_hw", 64))
    out_size = int(options.pop("out_size", 256))
    # Flip test-time augmentation: an inference option the head carries (and its checkpoint
    # stores), so that a loaded head predicts the way it was evaluated.
    tta = bool(options.pop("tta", False))
    if options.get("context") and kind != "cnn":
        raise SamliverError(f"context (2.5D input) is a cnn head option, not a {kind} one.")
    if options.get("fine_features") and kind != "cnn":
        raise SamliverError(f"fine_features is a cnn head option, not a {kind} one.")
    if model is not None:
        embed_dim = int(getattr(model, "embed_dim", embed_dim))
        embed_hw = int(getattr(model, "embed_hw", (64, 64))[0])
        out_size = int(getattr(model, "image_size", out_size))
    if kind == "linear":
        options.pop("use_image", None)
        head: Head = LinearHead(embed_dim, n_classes, out_size, embed_hw=embed_hw, **options)
    elif kind == "cnn":
        head = CNNHead(embed_dim, n_classes, out_size, embed_hw=embed_hw, **options)
    elif kind == "vit":
        head = ViTHead(embed_dim, n_classes, out_size, embed_hw=embed_hw, **options)
    else:
        if model is None and embed_dim % 8:
            raise SamliverError(f"autosam needs embed_dim divisible by 8, got {embed_dim}.")
        head = AutoSAMHead(embed_dim, n_classes, out_size, model=model, embed_hw=embed_hw,
                           **options)
    # What a checkpoint stores to rebuild the head (the grid only when no model fixes it).
    head.options = dict(options, embed_hw=embed_hw) if model is None else dict(options)
    head.tta = tta
    if tta:
        head.options["tta"] = True
    return head


def head_context(head: torch.nn.Module) -> int:
    """Neighbouring slices on each side that ``head`` reads (0: a 2D head)."""
    return int(getattr(head, "context", 0) or 0)


def head_fine_features(head: torch.nn.Module) -> int:
    """Channels of the finer encoder stage that ``head`` reads as ``fine=`` (0: none)."""
    return int(getattr(head, "fine_features", 0) or 0)


@torch.no_grad()
def predict_logits(head: torch.nn.Module, emb: np.ndarray | torch.Tensor,
                   images: np.ndarray | torch.Tensor | None = None, *, batch_size: int = 8,
                   device: str | None = None, out_size: int | None = None,
                   tta: bool = False, fine: np.ndarray | torch.Tensor | None = None) -> np.ndarray:
    """Class probabilities ``(N, n_classes, S, S)`` float32 for embeddings (and images).

    ``tta`` (default False) averages with the left-right flipped input (flip the embedding and
    image, flip the prediction back), the flip the heads are trained with. ``fine``
    ``(N, F, h', w')``: the finer encoder stage a head with ``fine_features`` reads.
    """
    device = device or next(head.parameters()).device
    head.eval()
    reads_fine = head_fine_features(head) > 0
    outs = []
    for i in range(0, len(emb), batch_size):
        x = torch.as_tensor(np.asarray(emb[i:i + batch_size], dtype=np.float32), device=device)
        im = None
        if images is not None and getattr(head, "uses_image", False):
            im = torch.as_tensor(np.asarray(images[i:i + batch_size], dtype=np.float32),
                                 device=device)[:, None]
        kw = {}
        if reads_fine and fine is not None:
            kw["fine"] = torch.as_tensor(np.asarray(fine[i:i + batch_size], dtype=np.float32),
                                         device=device)
        p = head(x, image=im, **kw).float().softmax(1)
        if tta:
            flipped = head(x.flip(-1), image=im.flip(-1) if im is not None else None,
                           **{k: v.flip(-1) for k, v in kw.items()})
            p = 0.5 * (p + flipped.float().softmax(1).flip(-1))
        if out_size and p.shape[-1] != out_size:
            p = F.interpolate(p, size=(out_size, out_size), mode="bilinear", align_corners=False)
        outs.append(p.cpu().numpy())
    return np.concatenate(outs) if outs else np.zeros((0,))
