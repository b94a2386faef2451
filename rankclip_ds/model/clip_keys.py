"""State-dict key maps between CLIP formats and our dual encoder (pure functions: tensors in, tensors out).

Three layouts of the same transformer (``/work/shared/CLIP_INTEROP.md`` §6, §7):

- ours: ``image_tower.trunk.*`` (a timm CLIP ViT), ``text_tower.encoder.*`` (a Hugging Face ``CLIPTextModel``),
  ``image_proj.weight`` / ``text_proj.weight`` [E, D], ``logit_scale`` (1,);
- Hugging Face ``CLIPModel``: ``vision_model.*``, ``text_model.*`` (q, k, v as three Linears),
  ``visual_projection.weight`` / ``text_projection.weight`` [E, D], ``logit_scale`` 0-d;
- open_clip ``CLIP``: ``visual.*``, the text transformer at the root (or under ``text.`` for ``custom_text``),
  q|k|v fused in ``in_proj_*`` [3D, D], projections ``visual.proj`` / ``text_projection`` [D, E] (``x @ proj``),
  ``logit_scale`` 0-d.

Each map goes through one neutral form per tower (stem tensors under short names, blocks with q|k|v fused) and
refuses a source tensor it does not place: a silently dropped tensor would be a model that differs from its source.
"""

from __future__ import annotations

import re

import torch

__all__ = ["hf_to_ours", "open_clip_to_ours", "ours_to_hf", "ours_to_open_clip"]

Tensors = dict[str, torch.Tensor]

# One transformer block: neutral part name → module name in each layout (each with .weight and .bias).
# "qkv" is the fused q|k|v projection [3D, D]; Hugging Face splits it into three Linears (q_proj, k_proj, v_proj).
_BLOCK = {
    "timm": {"norm1": "norm1", "qkv": "attn.qkv", "proj": "attn.proj", "norm2": "norm2", "fc1": "mlp.fc1",
             "fc2": "mlp.fc2"},
    "open_clip": {"norm1": "ln_1", "proj": "attn.out_proj", "norm2": "ln_2", "fc1": "mlp.c_fc", "fc2": "mlp.c_proj"},
    "hf": {"norm1": "layer_norm1", "proj": "self_attn.out_proj", "norm2": "layer_norm2", "fc1": "mlp.fc1",
           "fc2": "mlp.fc2"},
}  # fmt: skip
_BLOCKS_AT = {"timm": "blocks.", "open_clip": "transformer.resblocks.", "hf": "encoder.layers."}

# The tensors around the blocks: neutral name → key in each layout ("…​." names are norms with weight and bias).
_VISION_STEM = {
    "timm": {"cls": "cls_token", "pos": "pos_embed", "patch": "patch_embed.proj.weight", "pre.": "norm_pre.",
             "post.": "norm."},
    "open_clip": {"cls": "class_embedding", "pos": "positional_embedding", "patch": "conv1.weight", "pre.": "ln_pre.",
                  "post.": "ln_post."},
    "hf": {"cls": "embeddings.class_embedding", "pos": "embeddings.position_embedding.weight",
           "patch": "embeddings.patch_embedding.weight", "pre.": "pre_layrnorm.", "post.": "post_layernorm."},
}  # fmt: skip
_TEXT_STEM = {
    "open_clip": {"tok": "token_embedding.weight", "pos": "positional_embedding", "final.": "ln_final."},
    "hf": {"tok": "embeddings.token_embedding.weight", "pos": "embeddings.position_embedding.weight",
           "final.": "final_layer_norm."},
}  # fmt: skip
# timm keeps the class token as [1, 1, D] and the position embedding as [1, N, D]; the others drop the leading ones.
_TIMM_LEADING_ONES = {"cls": 2, "pos": 1}

OURS_IMAGE, OURS_TEXT = "image_tower.trunk.", "text_tower.encoder."


class KeyMapError(KeyError):
    """A state dict that is not the layout it was given as (a tensor missing, or one this map does not place)."""

    def __str__(self) -> str:  # KeyError would print the message in quotes
        return str(self.args[0])


def _pop(src: Tensors, key: str, what: str) -> torch.Tensor:
    if key not in src:
        near = sorted(k for k in src if k.rsplit(".", 1)[0] == key.rsplit(".", 1)[0])[:3] or sorted(src)[:3]
        raise KeyMapError(f"{what}: tensor {key!r} is missing (keys found nearby: {near})")
    return src.pop(key)


def _depth(src: Tensors, prefix: str) -> int:
    """The number of blocks stored under ``prefix`` (``…blocks.`` + index)."""
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    indices = {int(m.group(1)) for key in src if (m := pattern.match(key))}
    return max(indices) + 1 if indices else 0


def _take_blocks(src: Tensors, prefix: str, layout: str, what: str) -> list[Tensors]:
    """Pop every block under ``prefix`` into neutral form (``{"qkv.weight": [3D, D], ...}``)."""
    blocks = []
    at = prefix + _BLOCKS_AT[layout]
    for i in range(_depth(src, at)):
        block: Tensors = {}
        for part, module in _BLOCK[layout].items():
            for kind in ("weight", "bias"):
                block[f"{part}.{kind}"] = _pop(src, f"{at}{i}.{module}.{kind}", what)
        for kind in ("weight", "bias"):
            if layout == "open_clip":
                block[f"qkv.{kind}"] = _pop(src, f"{at}{i}.attn.in_proj_{kind}", what)
            elif layout == "hf":
                block[f"qkv.{kind}"] = torch.cat([_pop(src, f"{at}{i}.self_attn.{x}_proj.{kind}", what) for x in "qkv"])
        blocks.append(block)
    return blocks


def _put_blocks(blocks: list[Tensors], prefix: str, layout: str) -> Tensors:
    out: Tensors = {}
    at = prefix + _BLOCKS_AT[layout]
    for i, block in enumerate(blocks):
        for part, module in _BLOCK[layout].items():
            for kind in ("weight", "bias"):
                out[f"{at}{i}.{module}.{kind}"] = block[f"{part}.{kind}"]
        for kind in ("weight", "bias"):
            qkv = block[f"qkv.{kind}"]
            if layout == "open_clip":
                out[f"{at}{i}.attn.in_proj_{kind}"] = qkv
            elif layout == "hf":
                for name, piece in zip("qkv", qkv.chunk(3, dim=0), strict=True):
                    out[f"{at}{i}.self_attn.{name}_proj.{kind}"] = piece.contiguous()
    return out


def _take_stem(src: Tensors, prefix: str, stem: dict[str, str], layout: str, what: str) -> Tensors:
    out: Tensors = {}
    for name, key in stem.items():
        for suffix in ("weight", "bias") if name.endswith(".") else ("",):
            tensor = _pop(src, prefix + key + suffix, what)
            if layout == "timm" and name in _TIMM_LEADING_ONES:
                tensor = tensor.reshape(tensor.shape[_TIMM_LEADING_ONES[name] :])
            out[name + suffix] = tensor
    return out


def _put_stem(stem_tensors: Tensors, prefix: str, stem: dict[str, str], layout: str) -> Tensors:
    out: Tensors = {}
    for name, key in stem.items():
        for suffix in ("weight", "bias") if name.endswith(".") else ("",):
            tensor = stem_tensors[name + suffix]
            if layout == "timm" and name in _TIMM_LEADING_ONES:
                tensor = tensor.reshape((1,) * _TIMM_LEADING_ONES[name] + tuple(tensor.shape))
            out[prefix + key + suffix] = tensor
    return out


def _move_tower(
    src: Tensors, src_prefix: str, src_layout: str, dst_prefix: str, dst_layout: str, stem, what
) -> Tensors:
    """Pop one tower from ``src`` (``src_layout`` under ``src_prefix``) and return it in ``dst_layout``."""
    stem_tensors = _take_stem(src, src_prefix, stem[src_layout], src_layout, what)
    blocks = _take_blocks(src, src_prefix, src_layout, what)
    if not blocks:
        raise KeyMapError(f"{what}: no transformer blocks under {src_prefix + _BLOCKS_AT[src_layout]!r}")
    return _put_stem(stem_tensors, dst_prefix, stem[dst_layout], dst_layout) | _put_blocks(
        blocks, dst_prefix, dst_layout
    )


def _refuse_leftovers(src: Tensors, what: str) -> None:
    if src:
        raise KeyMapError(
            f"{what}: {len(src)} tensors have no place in our CLIP-type model (first: {sorted(src)[:5]}); "
            "the checkpoint holds parts this conversion does not know (a logit bias, an attention pooler, ...)"
        )


def _drop_buffers(state: Tensors) -> Tensors:
    # position_ids (old transformers checkpoints) and open_clip's causal attn_mask are buffers, not weights.
    return {k: v for k, v in state.items() if not k.endswith(("position_ids", "attn_mask"))}


# ------------------------------------------------------------------------------------------------ Hugging Face
def hf_to_ours(state: Tensors) -> Tensors:
    """A Hugging Face ``CLIPModel`` state dict in our keys (the whole dual encoder)."""
    what = "Hugging Face CLIPModel checkpoint"
    src = _drop_buffers(state)
    out = _move_tower(src, "vision_model.", "hf", OURS_IMAGE, "timm", _VISION_STEM, what)
    out |= _move_tower(src, "text_model.", "hf", OURS_TEXT, "hf", _TEXT_STEM, what)
    out["image_proj.weight"] = _pop(src, "visual_projection.weight", what)
    out["text_proj.weight"] = _pop(src, "text_projection.weight", what)
    out["logit_scale"] = _pop(src, "logit_scale", what).reshape(1)
    _refuse_leftovers(src, what)
    return out


def ours_to_hf(state: Tensors) -> Tensors:
    """Our CLIP-type dual encoder's state dict in Hugging Face ``CLIPModel`` keys."""
    what = "our CLIP-type model"
    src = dict(state)
    out = _move_tower(src, OURS_IMAGE, "timm", "vision_model.", "hf", _VISION_STEM, what)
    out |= _move_tower(src, OURS_TEXT, "hf", "text_model.", "hf", _TEXT_STEM, what)
    out["visual_projection.weight"] = _pop(src, "image_proj.weight", what)
    out["text_projection.weight"] = _pop(src, "text_proj.weight", what)
    out["logit_scale"] = _pop(src, "logit_scale", what).reshape(())
    _refuse_leftovers(src, what)
    return out


# ------------------------------------------------------------------------------------------------ open_clip
def open_clip_to_ours(state: Tensors, *, text_prefix: str = "") -> Tensors:
    """An open_clip ``CLIP`` state dict in our keys; ``text_prefix="text."`` for a ``CustomTextCLIP`` whose text
    tower is open_clip's own transformer (``custom_text: true``)."""
    what = "open_clip checkpoint"
    src = _drop_buffers(state)
    out = _move_tower(src, "visual.", "open_clip", OURS_IMAGE, "timm", _VISION_STEM, what)
    out |= _move_tower(src, text_prefix, "open_clip", OURS_TEXT, "hf", _TEXT_STEM, what)
    out["image_proj.weight"] = _pop(src, "visual.proj", what).T.contiguous()  # [D, E] (x @ proj) → [E, D]
    out["text_proj.weight"] = _pop(src, text_prefix + "text_projection", what).T.contiguous()
    out["logit_scale"] = _pop(src, "logit_scale", what).reshape(1)
    _refuse_leftovers(src, what)
    return out


def ours_to_open_clip(state: Tensors) -> Tensors:
    """Our CLIP-type dual encoder's state dict in open_clip ``CLIP`` keys (``logit_scale`` 0-d, as open_clip
    creates it; its loader reshapes either way)."""
    what = "our CLIP-type model"
    src = dict(state)
    out = _move_tower(src, OURS_IMAGE, "timm", "visual.", "open_clip", _VISION_STEM, what)
    out |= _move_tower(src, OURS_TEXT, "hf", "", "open_clip", _TEXT_STEM, what)
    out["visual.proj"] = _pop(src, "image_proj.weight", what).T.contiguous()
    out["text_projection"] = _pop(src, "text_proj.weight", what).T.contiguous()
    out["logit_scale"] = _pop(src, "logit_scale", what).reshape(())
    _refuse_leftovers(src, what)
    return out
