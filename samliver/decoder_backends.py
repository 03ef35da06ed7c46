"""A faster, exact mask decoder for prompts without a mask input: image work shared by all prompts.

SAM's :class:`MaskDecoder` copies the (256, 64, 64) image embedding once per prompt
(``repeat_interleave``) and pushes every copy through the two-way transformer: 4096 image tokens x
256 channels per prompt, 3.62 GFLOP per box for LiteMedSAM. But when no mask prompt is given, the
image tokens differ between prompts only by what they took from the few prompt tokens in the
image-to-token attentions: ``heads x tokens`` (8 x 7 = 56 for a box) vectors per layer. So the
image tokens of prompt ``b`` at transformer depth ``s`` can be written exactly as

    x_b = a_b * P_s + U_b @ R_b + c_b

with ``P_s`` (4096, 256) the same for every prompt (the embedding plus the no-mask embedding,
centred and scaled by the layer norms' gains: image-only), ``a_b`` (4096, 1) a per-token scale (one
over the layer norms' standard deviations), ``U_b`` (4096, r) attention weights, ``R_b`` (r, 256)
and ``c_b`` (1, 256) small per prompt (r = 57 after LiteMedSAM's first layer, 114 after its
second; stored transposed, image tokens last). Every linear map of the image tokens (key/value/
query projections, the first transposed convolution of the upscaler) then splits into
``P_s @ W.T``, computed once per slice (:meth:`SharedImageDecoder.prepare_slice`), and a rank-r
part per prompt. Layer norms stay exact: the centred tokens are formed from this form once, for
their variance. Only the upscaler's tail (layer norm, GELU, transposed convolution, GELU: 256 x 256
outputs) runs in full per prompt. The result equals SAM's decoder up to float32 rounding (the tests
compare against it) at 1.23 instead of 3.62 GFLOP per box; see ``docs/decoder_speed.md``.

This covers every model built from segment_anything's ``MaskDecoder`` / ``TwoWayTransformer``
(LiteMedSAM's vendored copy included), any number of point and box tokens, and multimask output.
A mask prompt (``mask_input``) changes the image tokens per prompt, so it takes SAM's own path.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# Prompts decoded together; larger batches are split. Per prompt the upscaler alone holds ~12 MB
# (LiteMedSAM), so big batches fall out of the CPU caches and got slower per prompt.
CHUNK = 4

_ATTENTION_PARTS = ("q_proj", "k_proj", "v_proj", "out_proj", "num_heads", "internal_dim")
_BLOCK_PARTS = (
    "self_attn", "norm1", "cross_attn_token_to_image", "norm2", "mlp", "norm3", "norm4",
    "cross_attn_image_to_token", "skip_first_layer_pe",
)


def token_self_attention(block: Any, queries: Any, query_pe: Any) -> Any:
    """The token side's first step of a segment_anything ``TwoWayAttentionBlock``: self-attention
    of the prompt / output tokens (with their positional encoding unless the block skips it) and
    ``norm1``, as the block computes it. The rewritten decoders (this module's, and the AutoSAM
    head's) change only the image side, the cost.

    Args:
        block: a ``TwoWayAttentionBlock``.
        queries: (B, T, C) tokens.
        query_pe: (B, T, C) the tokens' positional encoding (the initial tokens).

    Returns:
        The (B, T, C) tokens after the block's self-attention and ``norm1``.
    """
    if block.skip_first_layer_pe:
        queries = block.self_attn(q=queries, k=queries, v=queries)
    else:
        q = queries + query_pe
        queries = queries + block.self_attn(q=q, k=q, v=queries)
    return block.norm1(queries)


def supports_shared_decoder(mask_decoder: Any) -> bool:
    """Whether ``mask_decoder`` has the structure :class:`SharedImageDecoder` relies on.

    Args:
        mask_decoder: a mask decoder module.

    Returns:
        True for segment_anything's ``MaskDecoder`` with a ``TwoWayTransformer`` (or a copy of
        these classes under the same names, as LiteMedSAM vendors them); False otherwise, e.g.
        for decoders whose forward differs (HQ-SAM and the like).
    """

    if type(mask_decoder).__name__ != "MaskDecoder":
        return False
    transformer = getattr(mask_decoder, "transformer", None)
    if type(transformer).__name__ != "TwoWayTransformer" or not len(getattr(transformer, "layers", ())):
        return False
    for block in transformer.layers:
        if type(block).__name__ != "TwoWayAttentionBlock" or not all(hasattr(block, p) for p in _BLOCK_PARTS):
            return False
        for name in ("self_attn", "cross_attn_token_to_image", "cross_attn_image_to_token"):
            attn = getattr(block, name)
            if type(attn).__name__ != "Attention" or not all(hasattr(attn, p) for p in _ATTENTION_PARTS):
                return False
    final = getattr(transformer, "final_attn_token_to_image", None)
    if type(final).__name__ != "Attention" or not hasattr(transformer, "norm_final_attn"):
        return False
    up = getattr(mask_decoder, "output_upscaling", None)
    if up is None or len(up) != 5 or type(up[1]).__name__ != "LayerNorm2d":
        return False
    return all(_is_patch_conv(up[i]) for i in (0, 3)) and all(hasattr(up[1], p) for p in ("weight", "bias", "eps"))


def _is_patch_conv(conv: Any) -> bool:
    """A ConvTranspose2d with kernel 2 and stride 2: one (C_in -> 4 C_out) linear map per input pixel."""
    import torch

    return (
        isinstance(conv, torch.nn.ConvTranspose2d)
        and tuple(conv.kernel_size) == (2, 2)
        and tuple(conv.stride) == (2, 2)
        and tuple(conv.padding) == (0, 0)
        and tuple(conv.output_padding) == (0, 0)
        and conv.groups == 1
        and tuple(conv.dilation) == (1, 1)
    )


def _patch_matrix(conv: Any):
    """A kernel-2 stride-2 ConvTranspose2d as ``(weight (C_in, 4 C_out), bias (4 C_out,))``, outputs
    ordered (dy, dx, channel) so that channels stay the fastest axis (no reshuffling between steps)."""
    c_in, c_out = conv.weight.shape[:2]
    weight = conv.weight.permute(0, 2, 3, 1).reshape(c_in, 4 * c_out)
    bias = conv.bias.repeat(4) if conv.bias is not None else weight.new_zeros(4 * c_out)
    return weight, bias


@dataclass
class _Stage:
    """The image-only part ``P_s`` of the image tokens at one transformer depth, and its projections.

    Projections are stored per head, (H, HW, d), contiguous, ready for batched matmuls.
    """

    centred_t: Any  # (C, HW) P_s minus its per-token mean, transposed: for the layer norm statistics
    k: Any  # (H, HW, d) P_s @ Wk.T of the token-to-image attention
    k_pe: Any  # (H, HW, d) pe @ Wk.T + bk
    v: Any  # (H, HW, d) P_s @ Wv.T
    q: Any = None  # (H, HW, d) P_s @ Wq.T of the image-to-token attention (transformer layers)
    q_pe: Any = None  # (H, HW, d) pe @ Wq.T + bq
    up: Any = None  # (HW, 4 C_up) P_s through the first upscaling convolution (final stage only)


@dataclass
class SliceCache:
    """What :meth:`SharedImageDecoder.prepare_slice` computes once per embedding, shared by all prompts."""

    stages: list  # one _Stage per transformer layer, plus one for the final attention and the upscaler
    hw: tuple  # (h, w) of the embedding grid


@dataclass
class _Tokens:
    """Image tokens of B prompts as ``x.T = a * P_s.T + U.T @ R + c`` (see the module docstring).

    Per-prompt image quantities keep the image tokens on the last (contiguous) axis, so that
    softmaxes over the few prompt tokens and the layer norm statistics run over long rows.
    """

    a: Any  # (B, 1, HW)
    u: Any  # (B, r, HW), or None while r == 0
    r: Any  # (B, r, C), or None
    c: Any  # (B, 1, C)


def _per_head(x, heads: int):
    """(HW, D) -> (H, HW, D / H), contiguous."""
    n, d = x.shape
    return x.reshape(n, heads, d // heads).transpose(0, 1).contiguous()


class SharedImageDecoder:
    """SAM's mask decoder for prompts without a mask input, sharing the image work across prompts.

    ``prepare_slice(features, image_pe)`` once per image embedding, then ``decode(cache, sparse)``
    for any number of prompts at once. Same outputs as ``mask_decoder(...)`` up to float32
    rounding (see the module docstring for the algebra).
    """

    def __init__(self, prompt_encoder: Any, mask_decoder: Any) -> None:
        if not supports_shared_decoder(mask_decoder):
            raise ValueError(
                f"{type(mask_decoder).__name__} is not a segment_anything MaskDecoder with a TwoWayTransformer."
            )
        self.prompt_encoder = prompt_encoder
        self.decoder = mask_decoder
        self.transformer = mask_decoder.transformer
        self._pe_key: tuple | None = None
        self._pe_proj: list | None = None

    def _attentions(self, depth: int):
        """The token-to-image attention at ``depth`` and the image-to-token one (None at the final depth)."""
        tr = self.transformer
        if depth == len(tr.layers):
            return tr.final_attn_token_to_image, None
        return tr.layers[depth].cross_attn_token_to_image, tr.layers[depth].cross_attn_image_to_token

    def _positional_projections(self, image_pe: Any) -> list:
        """Per depth, ``(pe @ Wk.T + bk, pe @ Wq.T + bq)`` per head: the same for every image, so
        computed once and recomputed only when ``image_pe`` or the decoder's weights change
        (in-place updates bump the weights' version counters) or move."""
        import torch

        params = tuple(
            (p.data_ptr(), p.device, p.dtype, 0 if p.is_inference() else p._version) for p in self.decoder.parameters()
        )
        if self._pe_key is None or self._pe_key[0] != params or not (
            self._pe_key[1].shape == image_pe.shape and self._pe_key[1].device == image_pe.device
            and torch.equal(self._pe_key[1], image_pe)
        ):
            ch = image_pe.shape[1]
            pe = image_pe[0].reshape(ch, -1).T
            proj = []
            for depth in range(len(self.transformer.layers) + 1):
                t2i, i2t = self._attentions(depth)
                k_pe = _per_head(torch.nn.functional.linear(pe, t2i.k_proj.weight, t2i.k_proj.bias), t2i.num_heads)
                q_pe = None
                if i2t is not None:
                    q_pe = _per_head(torch.nn.functional.linear(pe, i2t.q_proj.weight, i2t.q_proj.bias), i2t.num_heads)
                proj.append((k_pe, q_pe))
            self._pe_key, self._pe_proj = (params, image_pe.clone()), proj
        return self._pe_proj

    # -- per slice --------------------------------------------------------------------
    def prepare_slice(self, features: Any, image_pe: Any) -> SliceCache:
        """The image-only work for one embedding: 2.7 GFLOP for LiteMedSAM, three quarters of one
        prompt's worth of SAM's decoder, in a few large matrix products.

        Args:
            features: (1, C, h, w) image embedding.
            image_pe: (1, C, h, w) dense positional encoding (``prompt_encoder.get_dense_pe()``).

        Returns:
            A :class:`SliceCache` for :meth:`decode`.
        """
        import torch

        if features.ndim != 4 or features.shape[0] != 1:
            raise ValueError(f"prepare_slice expects one (1, C, h, w) embedding, got {tuple(features.shape)}.")
        _, ch, h, w = features.shape
        tr = self.transformer
        with torch.inference_mode():
            pe_proj = self._positional_projections(image_pe)
            no_mask = self.prompt_encoder.no_mask_embed.weight.reshape(1, ch)
            p = features[0].reshape(ch, h * w).T + no_mask  # (HW, C): src + dense (no mask)
            stages = []
            for depth in range(len(tr.layers) + 1):
                t2i, i2t = self._attentions(depth)
                third = _patch_matrix(self.decoder.output_upscaling[0])[0] if i2t is None else i2t.q_proj.weight.T
                mats = [t2i.k_proj.weight.T, t2i.v_proj.weight.T, third]
                # One GEMM for all of this depth's maps of P_s (faster than three smaller ones).
                fused = p @ torch.cat(mats, dim=1)
                k_end = mats[0].shape[1]
                v_end = k_end + mats[1].shape[1]
                stage = _Stage(
                    centred_t=None,
                    k=_per_head(fused[:, :k_end], t2i.num_heads),
                    k_pe=pe_proj[depth][0],
                    v=_per_head(fused[:, k_end:v_end], t2i.num_heads),
                )
                if i2t is None:
                    stage.up = fused[:, v_end:].contiguous()
                else:
                    stage.q = _per_head(fused[:, v_end:], i2t.num_heads)
                    stage.q_pe = pe_proj[depth][1]
                    centred = p - p.mean(dim=1, keepdim=True)
                    stage.centred_t = centred.T.contiguous()
                    p = centred * tr.layers[depth].norm4.weight
                stages.append(stage)
        return SliceCache(stages=stages, hw=(h, w))

    # -- per prompt -------------------------------------------------------------------
    @staticmethod
    def _token_to_image(attn, queries, keys: _Tokens, stage: _Stage):
        """``attn(q=queries, k=keys + pe, v=keys)``, prompt tokens attending to the image: (B, T, C)."""
        import torch

        b, t, _ = queries.shape
        heads = attn.num_heads
        q = attn.q_proj(queries)
        d = q.shape[-1] // heads
        q = (q * d**-0.5).reshape(b, t, heads, d)
        qh = q.permute(2, 0, 1, 3).reshape(heads, b * t, d)
        hw = stage.k.shape[1]
        a_row = keys.a.view(1, b, 1, hw)
        # scores = q . (a * kP + (pe Wk.T + bk) + U.T (R Wk.T) + c Wk.T), laid out (H, B, T, HW).
        scores = (torch.bmm(qh, stage.k.transpose(1, 2)).view(heads, b, t, hw) * a_row).view(heads, b * t, hw)
        scores = torch.baddbmm(scores, qh, stage.k_pe.transpose(1, 2)).view(heads, b, t, hw)
        wk = attn.k_proj.weight
        scores = scores + torch.einsum("bthd,bhd->hbt", q, (keys.c @ wk.T).reshape(b, heads, d))[..., None]
        if keys.u is not None:
            small = torch.einsum("bthd,brhd->bhtr", q, (keys.r @ wk.T).reshape(b, -1, heads, d))
            low = torch.bmm(small.reshape(b, heads * t, -1), keys.u)
            scores = scores + low.view(b, heads, t, hw).transpose(0, 1)
        probs = torch.softmax(scores, dim=-1)  # (H, B, T, HW)
        # out = probs @ v with v = a * vP + U.T (R Wv.T) + c Wv.T + bv (each row of probs sums to 1).
        out = torch.bmm((probs * a_row).view(heads, b * t, hw), stage.v).view(heads, b, t, d).permute(1, 2, 0, 3)
        wv = attn.v_proj.weight
        out = out + torch.nn.functional.linear(keys.c, wv, attn.v_proj.bias).reshape(b, 1, heads, d)
        if keys.u is not None:
            pu = torch.bmm(probs.transpose(0, 1).reshape(b, heads * t, hw), keys.u.transpose(1, 2))
            out = out + torch.einsum("bhtr,brhd->bthd", pu.view(b, heads, t, -1), (keys.r @ wv.T).reshape(b, -1, heads, d))
        return attn.out_proj(out.reshape(b, t, heads * d))

    @staticmethod
    def _image_to_token(attn, keys: _Tokens, stage: _Stage, q_tokens, v_tokens):
        """``attn(q=keys + pe, k=q_tokens, v=v_tokens)``, the image attending to the prompt tokens.

        Returns:
            probs (B, H * T, HW) and values (B, H * T, C): the attention output per image token is
            ``probs.T @ values + attn.out_proj.bias``, so they extend U and R.
        """
        import torch

        b, t, _ = q_tokens.shape
        heads = attn.num_heads
        k = attn.k_proj(q_tokens)
        d = k.shape[-1] // heads
        k = (k * d**-0.5).reshape(b, t, heads, d)
        kh = k.permute(2, 0, 1, 3).reshape(heads, b * t, d)
        hw = stage.q.shape[1]
        # scores = (a * qP + (pe Wq.T + bq) + U.T (R Wq.T) + c Wq.T) . k, laid out (B, H, T, HW).
        scores = (torch.bmm(kh, stage.q.transpose(1, 2)).view(heads, b, t, hw) * keys.a.view(1, b, 1, hw))
        scores = torch.baddbmm(scores.view(heads, b * t, hw), kh, stage.q_pe.transpose(1, 2))
        scores = scores.view(heads, b, t, hw).transpose(0, 1)
        wq = attn.q_proj.weight
        const = torch.einsum("bhd,bthd->bht", (keys.c @ wq.T).reshape(b, heads, d), k)[..., None]
        if keys.u is not None:
            small = torch.einsum("brhd,bthd->bhtr", (keys.r @ wq.T).reshape(b, -1, heads, d), k)
            low = torch.bmm(small.reshape(b, heads * t, -1), keys.u).view(b, heads, t, hw)
            scores = low + scores + const
        else:
            scores = (scores + const).contiguous()
        # Softmax over the prompt tokens, a non-last axis: rows of T = 7 as the last axis are ~20x slower.
        probs = torch.softmax(scores, dim=2).view(b, heads * t, hw)
        # out_proj(concat_h probs_h v_h) = sum_h probs_h (v_h Wo_h.T): an (H * T, C) basis per prompt.
        v = attn.v_proj(v_tokens).reshape(b, t, heads, d)
        wo = attn.out_proj.weight
        values = torch.einsum("bthd,chd->bhtc", v, wo.reshape(wo.shape[0], heads, d))
        return probs, values.reshape(b, heads * t, -1)

    @staticmethod
    def _layer_norm(keys: _Tokens, stage: _Stage, norm) -> _Tokens:
        """``norm(keys)`` (LayerNorm over channels) in the same low-rank form, at the next depth."""
        import torch

        b = keys.c.shape[0]
        basis = keys.c if keys.r is None else torch.cat([keys.r, keys.c], dim=1)  # (B, r + 1, C)
        basis = basis - basis.mean(dim=2, keepdim=True)
        ones = keys.a.new_ones(keys.a.shape)
        coeff = ones if keys.u is None else torch.cat([keys.u, ones], dim=1)  # (B, r + 1, HW)
        # The centred tokens x - mean = a * Pc + coeff.T @ basis, formed once for their variance
        # (cheaper than expanding |x - mean|^2 into its three terms).
        centred = torch.bmm(basis.transpose(1, 2), coeff).addcmul_(keys.a, stage.centred_t)  # (B, C, HW)
        var = centred.square_().mean(dim=1, keepdim=True)  # (B, 1, HW)
        inv = torch.rsqrt(var + norm.eps)
        bias = norm.bias if norm.bias is not None else torch.zeros_like(norm.weight)
        return _Tokens(keys.a * inv, coeff * inv, basis * norm.weight, bias.expand(b, 1, -1))

    def _upscale(self, keys: _Tokens, stage: _Stage):
        """The output upscaler on the final image tokens: (B, 16 HW, C_up2), pixels ordered
        (y, x, dy1, dx1, dy2, dx2) and channels last (undone in :meth:`decode`)."""
        import torch
        import torch.nn.functional as F

        up = self.decoder.output_upscaling
        w1, b1 = _patch_matrix(up[0])
        b = keys.a.shape[0]
        const = keys.c @ w1 + b1  # (B, 1, 4 C1)
        if keys.u is None:
            pix = const.expand(b, stage.up.shape[0], -1).clone()
        else:
            pix = torch.baddbmm(const, keys.u.transpose(1, 2), keys.r @ w1)
        pix.addcmul_(keys.a.transpose(1, 2), stage.up)  # (B, HW, 4 C1)
        c1 = w1.shape[1] // 4
        norm = up[1]
        x = self._activation(up[2], F.layer_norm(pix.view(b, -1, c1), (c1,), norm.weight, norm.bias, norm.eps))
        w2, b2 = _patch_matrix(up[3])
        x = self._activation(up[4], torch.addmm(b2, x.view(-1, c1), w2))  # (B * 4 HW, 4 C2)
        return x.view(b, -1, w2.shape[1] // 4)

    @staticmethod
    def _activation(module, x):
        """``module(x)``; a GELU in place (the upscaler's are over 1-2 M values per prompt: no new
        4-8 MB tensor, ~1 ms less per box), except while traced for OpenVINO (plain ops there)."""
        import torch

        if type(module) is torch.nn.GELU and not torch.jit.is_tracing():
            return torch.ops.aten.gelu_(x, approximate=module.approximate)
        return module(x)

    def decode(self, cache: SliceCache, sparse: Any, multimask_output: bool = False, chunk: int = CHUNK):
        """Masks for B prompts without a mask input.

        Args:
            cache: from :meth:`prepare_slice` for the current embedding.
            sparse: (B, N, C) sparse prompt embeddings from the prompt encoder.
            multimask_output: the three multimask outputs instead of the single-mask one.
            chunk: prompts decoded together (default :data:`CHUNK`); larger batches are split.

        Returns:
            ``(low_res_logits (B, K, 4h, 4w), iou (B, K))`` as SAM's ``MaskDecoder.forward``.
        """
        import torch

        if sparse.shape[0] > chunk:
            parts = [self.decode(cache, sparse[i : i + chunk], multimask_output, chunk) for i in range(0, sparse.shape[0], chunk)]
            return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
        first, last = (1, self.decoder.num_mask_tokens) if multimask_output else (0, 1)
        with torch.inference_mode():
            return self.decode_outputs(cache, sparse, first, last)

    def decode_outputs(self, cache: SliceCache, sparse: Any, first: int, last: int):
        """The mask outputs ``first:last`` of the decoder (0:1 single mask, 1:4 multimask) for B
        prompts, no batch splitting and no grad mode of its own (so that it can be traced).

        Args:
            cache: from :meth:`prepare_slice`.
            sparse: (B, N, C) sparse prompt embeddings.
            first: the first mask token to decode.
            last: one past the last.

        Returns:
            ``(low_res_logits (B, last - first, 4h, 4w), iou (B, last - first))``.
        """
        import torch

        dec, tr = self.decoder, self.transformer
        bsz = sparse.shape[0]
        h, w = cache.hw
        out_tokens = torch.cat([dec.iou_token.weight, dec.mask_tokens.weight], dim=0)
        tokens = torch.cat([out_tokens[None].expand(bsz, -1, -1), sparse], dim=1)
        keys = _Tokens(tokens.new_ones(bsz, 1, h * w), None, None, tokens.new_zeros(bsz, 1, tokens.shape[2]))
        queries, query_pe = tokens, tokens
        for depth, block in enumerate(tr.layers):
            stage = cache.stages[depth]
            queries = token_self_attention(block, queries, query_pe)
            attn_out = self._token_to_image(block.cross_attn_token_to_image, queries + query_pe, keys, stage)
            queries = block.norm2(queries + attn_out)
            queries = block.norm3(queries + block.mlp(queries))
            i2t = block.cross_attn_image_to_token
            probs, values = self._image_to_token(i2t, keys, stage, queries + query_pe, queries)
            c = keys.c if i2t.out_proj.bias is None else keys.c + i2t.out_proj.bias
            u = probs if keys.u is None else torch.cat([keys.u, probs], dim=1)
            r = values if keys.r is None else torch.cat([keys.r, values], dim=1)
            keys = self._layer_norm(_Tokens(keys.a, u, r, c), stage, block.norm4)
        stage = cache.stages[len(tr.layers)]
        attn_out = self._token_to_image(tr.final_attn_token_to_image, queries + query_pe, keys, stage)
        queries = tr.norm_final_attn(queries + attn_out)
        hyper = torch.stack(
            [dec.output_hypernetworks_mlps[i](queries[:, 1 + i, :]) for i in range(first, last)], dim=2
        )  # (B, C_up2, K)
        # The upscaler's tensors are large (12 MB per prompt for LiteMedSAM): one prompt at a
        # time keeps them in cache.
        masks = torch.cat([
            torch.bmm(self._upscale(_Tokens(*(x[i : i + 1] for x in (keys.a, keys.u, keys.r, keys.c))), stage), hyper[i : i + 1])
            for i in range(bsz)
        ])  # (B, 16 HW, K)
        k = masks.shape[2]
        masks = masks.view(bsz, h, w, 2, 2, 2, 2, k).permute(0, 7, 1, 3, 5, 2, 4, 6).reshape(bsz, k, 4 * h, 4 * w)
        iou = dec.iou_prediction_head(queries[:, 0, :])[:, first:last]
        return masks, iou


# -- OpenVINO -----------------------------------------------------------------------------------

OPENVINO_PRECISIONS = ("fp32", "bf16")
# Bump when the traced graph or its inputs change: exports of older versions are then rebuilt.
OPENVINO_EXPORT_VERSION = 1
_STAGE_FIELDS = ("centred_t", "k", "k_pe", "v", "q", "q_pe", "up")
# Traced graphs of this process by export key: a new Predictor (or a fresh $SAMLIVER_HOME) does not
# trace again (5-20 s). A few entries: one per model, weights and multimask setting in use.
_TRACED: dict = {}
_TRACED_MAX = 4
# Prompts of this many sparse tokens (a box alone, or one point with its padding point) run on a
# graph compiled for static shapes: 1.19x faster than the dynamic-shape graph (bf16, one thread),
# which serves the other token counts without a compile per count.
STATIC_TOKENS = 2


def openvino_installed() -> bool:
    """Whether the optional ``openvino`` package can be imported."""
    import importlib.util

    return importlib.util.find_spec("openvino") is not None


def _weights_digest(module: Any) -> str:
    """SHA-256 over a module's parameters and buffers (names, shapes, dtypes, bytes): the
    OpenVINO graph holds the decoder's weights as constants, so its export is keyed by them."""
    import hashlib

    import torch

    digest = hashlib.sha256()
    with torch.no_grad():
        for name, t in list(module.named_parameters()) + list(module.named_buffers()):
            digest.update(f"{name}|{tuple(t.shape)}|{t.dtype}".encode())
            digest.update(t.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


class OpenVINODecoder:
    """:class:`SharedImageDecoder`'s per-prompt decode as one OpenVINO graph (CPU only).

    The slice cache (:meth:`SharedImageDecoder.prepare_slice`, still computed by torch) is bound
    to the graph's inputs once per slice; each prompt is then one inference. OpenVINO fuses the
    element-wise tail that eager torch runs as separate passes over 4-8 MB tensors (the layer
    norms, the GELUs, the hypernetwork contraction). With ``precision="bf16"`` (on CPUs with native
    bfloat16: AVX512-BF16 or AMX) the graph runs in bfloat16 and the slice cache is stored in
    bfloat16, halving the memory traffic: ~2x the eager shared decoder's speed at mask Dice
    ~0.999 against it; ``"fp32"`` is exact to float32 rounding at ~1.3x (docs/decoder_speed.md).

    The graph (one per ``multimask_output`` value, any number of prompt tokens) is traced on first
    use and kept as OpenVINO IR under ``folder`` (keyed by the decoder's weights and the OpenVINO
    version), so later processes only compile it (~1-2 s).

    Args:
        shared: the torch shared-image decoder whose decode is exported.
        precision: ``"bf16"`` or ``"fp32"`` (OpenVINO's inference precision).
        threads: OpenVINO CPU threads (None: one per core).
        folder: where exports are kept (None: traced anew in each process).

    Raises:
        ValueError: an unknown precision.
    """

    def __init__(self, shared: SharedImageDecoder, precision: str = "bf16", threads: int | None = None,
                 folder: Any = None) -> None:
        if precision not in OPENVINO_PRECISIONS:
            raise ValueError(f"Unknown OpenVINO decoder precision {precision!r}: choose one of {OPENVINO_PRECISIONS}.")
        self.shared = shared
        self.precision = precision
        self.threads = int(threads) if threads else None
        self.folder = folder
        self._core = None
        self._requests: dict = {}  # (multimask_output, STATIC_TOKENS or None) -> infer request
        self._bound: dict = {}  # same keys -> the SliceCache bound to that request
        self._weights: tuple | None = None  # (params key, digest) of the traced weights
        self._param_list: list | None = None  # the decoder's parameters, listed once per slice
        self._weights_owner: Any = None  # the decoder copy whose memory the traced graph's constants use

    def _params_key(self) -> tuple:
        # Checked on every prompt, so the parameter list is walked from the module tree only once
        # per slice (decode drops it on a new slice): the walk cost ~0.5 ms a prompt. In-place updates (optimiser
        # steps, load_state_dict) bump a tensor's version and are seen at once; a parameter
        # replaced by a new object is seen from the next slice on.
        if self._param_list is None:
            self._param_list = list(self.shared.decoder.parameters())
        return tuple((p.data_ptr(), 0 if p.is_inference() else p._version) for p in self._param_list)

    def _inputs(self, cache: SliceCache) -> tuple[list, list]:
        """The cache's tensors in graph-input order and the layout (field names per stage)."""
        layout, tensors = [], []
        for stage in cache.stages:
            names = [f for f in _STAGE_FIELDS if getattr(stage, f) is not None]
            layout.append(names)
            tensors += [getattr(stage, f) for f in names]
        return layout, tensors

    def _export(self, cache: SliceCache, sparse: Any, multimask: bool):
        """The OpenVINO model of ``decode_outputs`` for one prompt: read from ``folder``, copied
        from this process's earlier trace, or traced (a fresh copy each time: callers change it)."""
        import copy
        import json
        import warnings
        from pathlib import Path

        import openvino as ov
        import torch

        layout, tensors = self._inputs(cache)
        shared, hw = self.shared, cache.hw
        first, last = (1, shared.decoder.num_mask_tokens) if multimask else (0, 1)
        key = {
            "version": OPENVINO_EXPORT_VERSION, "openvino": ov.__version__, "torch": torch.__version__,
            "weights": self._weights[1], "hw": list(hw), "layout": layout, "outputs": [first, last],
            "shapes": [list(t.shape) for t in tensors], "channels": int(sparse.shape[-1]),
        }
        name = f"decoder-{'multimask' if multimask else 'single'}"
        target = Path(self.folder) / name if self.folder is not None else None
        memo = json.dumps(key, sort_keys=True)
        if target is not None:
            try:
                if json.loads((target / "key.json").read_text()) == key and (target / "decoder.bin").is_file():
                    return ov.Core().read_model(str(target / "decoder.xml"))
            except (OSError, ValueError):
                pass  # missing or unreadable: rebuilt below
        if memo in _TRACED:
            model, self._weights_owner = _TRACED[memo][0].clone(), _TRACED[memo][1]
            self._save(model, key, target)
            return model

        # The converted graph's constants share memory with the traced module's weights (clones
        # too): tracing the live decoder would let a later in-place update (an optimiser step,
        # load_state_dict) rewrite this process's memo of the old weights. A private copy, kept
        # alive beside the memo, holds them still.
        frozen = SharedImageDecoder(shared.prompt_encoder, copy.deepcopy(shared.decoder))

        class _PerPrompt(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.decoder = frozen.decoder  # its weights as module parameters, not captured tensors

            def forward(self, sparse_tokens, *cache_tensors):
                it = iter(cache_tensors)
                stages = []
                for names in layout:
                    fields = dict.fromkeys(_STAGE_FIELDS)
                    fields.update({n: next(it) for n in names})
                    stages.append(_Stage(**fields))
                return frozen.decode_outputs(SliceCache(stages=stages, hw=hw), sparse_tokens, first, last)

        # Traced outside inference mode (inference tensors cannot be traced), on copies.
        with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tracer warnings about Python-level shape checks
            example = (sparse[:1].clone(), *(t.clone() for t in tensors))
            model = ov.convert_model(_PerPrompt(), example_input=example)
        while len(_TRACED) >= _TRACED_MAX:
            _TRACED.pop(next(iter(_TRACED)))
        _TRACED[memo] = (model.clone(), frozen)
        self._weights_owner = frozen
        self._save(model, key, target)
        return model

    @staticmethod
    def _save(model: Any, key: dict, target: Any) -> None:
        """Write ``model`` as OpenVINO IR with its ``key.json`` into the folder ``target`` (None:
        nowhere), whole or not at all: a crash never leaves a half-written export."""
        import json

        import openvino as ov

        from .util import atomic_folder

        if target is None:
            return
        try:
            with atomic_folder(target) as tmp:
                # compress_to_fp16=False: the weights stay float32 (the default would round them).
                ov.save_model(model, str(tmp / "decoder.xml"), compress_to_fp16=False)
                (tmp / "key.json").write_text(json.dumps(key, indent=1))
        except OSError:
            pass  # an unwritable cache only costs the next process a new trace

    def _request(self, cache: SliceCache, sparse: Any, multimask: bool):
        """The infer request for these prompts and its key (built and compiled at first use)."""
        import openvino as ov
        from openvino.preprocess import PrePostProcessor

        params = self._params_key()
        if self._weights is None or self._weights[0] != params:
            # The graph holds the weights: a weight update (in place or not) needs a new graph.
            self._weights = (params, _weights_digest(self.shared.decoder))
            self._requests, self._bound = {}, {}
        tokens = int(sparse.shape[1])
        key = (multimask, tokens if tokens == STATIC_TOKENS else None)
        if key not in self._requests:
            model = self._export(cache, sparse, multimask)  # a fresh copy: changed below
            if key[1] is not None:
                shapes = {0: ov.PartialShape([1, tokens, int(sparse.shape[2])])}
                for i, t in enumerate(self._inputs(cache)[1], start=1):
                    shapes[i] = ov.PartialShape(list(t.shape))
                model.reshape(shapes)
            if self.precision == "bf16":
                # The slice cache is handed over in bfloat16 (half the bytes read per prompt).
                ppp = PrePostProcessor(model)
                for i in range(1, len(model.inputs)):
                    ppp.input(i).tensor().set_element_type(ov.Type.bf16)
                model = ppp.build()
            if self._core is None:
                self._core = ov.Core()
                if self.folder is not None:
                    self._core.set_property({"CACHE_DIR": str(self.folder) + "/compiled"})
            config = {"INFERENCE_PRECISION_HINT": "bf16" if self.precision == "bf16" else "f32",
                      "PERFORMANCE_HINT": "LATENCY"}
            if self.threads:
                config["INFERENCE_NUM_THREADS"] = self.threads
            self._requests[key] = self._core.compile_model(model, "CPU", config).create_infer_request()
        return self._requests[key], key

    def _bind(self, request, cache: SliceCache) -> None:
        """Hand the slice cache to ``request`` (once per slice): float32 shared, or bfloat16 copies."""
        import numpy as np
        import openvino as ov
        import torch

        for i, t in enumerate(self._inputs(cache)[1], start=1):
            t = t.detach().cpu().contiguous()
            if self.precision == "bf16":
                bits = t.to(torch.bfloat16).view(torch.int16).numpy()
                tensor = ov.Tensor(ov.Type.bf16, list(t.shape))
                np.copyto(tensor.data.view(np.int16), bits)
            else:
                tensor = ov.Tensor(np.ascontiguousarray(t.float().numpy()))
            request.set_input_tensor(i, tensor)

    def decode(self, cache: SliceCache, sparse: Any, multimask_output: bool = False):
        """As :meth:`SharedImageDecoder.decode`, one prompt per inference.

        Args:
            cache: from :meth:`SharedImageDecoder.prepare_slice` (on the CPU).
            sparse: (B, N, C) sparse prompt embeddings.
            multimask_output: the three multimask outputs instead of the single-mask one.

        Returns:
            ``(low_res_logits (B, K, 4h, 4w), iou (B, K))`` float32 CPU tensors.
        """
        import numpy as np
        import openvino as ov
        import torch

        if not any(bound is cache for bound in self._bound.values()):
            self._param_list = None  # a new slice: list the parameters anew
        request, key = self._request(cache, sparse, multimask_output)
        if self._bound.get(key) is not cache:
            self._bind(request, cache)
            self._bound[key] = cache
        sparse = sparse.detach().cpu().float().numpy()
        masks, ious = [], []
        for i in range(len(sparse)):
            request.set_input_tensor(0, ov.Tensor(np.ascontiguousarray(sparse[i : i + 1])))
            request.infer()
            masks.append(np.array(request.get_output_tensor(0).data, dtype=np.float32, copy=True))
            ious.append(np.array(request.get_output_tensor(1).data, dtype=np.float32, copy=True))
        return torch.from_numpy(np.concatenate(masks)), torch.from_numpy(np.concatenate(ious))
