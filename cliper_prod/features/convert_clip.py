"""Convert an OpenAI-format CLIP or Long-CLIP ``.pt`` state dict into a transformers folder.

OpenAI's CLIP (and Long-CLIP, which keeps its layout) stores fused attention projections
(``in_proj_weight``), ``[width, dim]`` projection matrices and, for Long-CLIP, two text position
tables: positions 0-19 come from ``positional_embedding`` and 20-247 from
``positional_embedding_res``. The converted model computes the same function: QuickGELU, the
text feature taken at the end-of-text token (the highest id, as OpenAI does), no biases on the
projections. The tokenizer files are copied from an existing CLIP folder (the BPE vocabulary is
the same for CLIP and Long-CLIP).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from torch import Tensor

from cliper_prod.errors import ConversionError
from cliper_prod.features.image_preprocess import CLIP_MEAN, CLIP_STD

LONGCLIP_KEEP = 20  # Long-CLIP keeps the first 20 of CLIP's text positions
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "vocab.json", "merges.txt")


def _layers(sd: dict[str, Tensor], prefix: str) -> int:
    return len({k.split(".")[len(prefix.split("."))] for k in sd
                if k.startswith(prefix) and k.endswith(".attn.in_proj_weight")})


def _block(sd: dict[str, Tensor], src: str, dst: str) -> dict[str, Tensor]:
    """One residual attention block, OpenAI names -> transformers names."""
    out = {}
    for qkv, (w, b) in zip(("q", "k", "v"), zip(sd[f"{src}.attn.in_proj_weight"].chunk(3),
                                                 sd[f"{src}.attn.in_proj_bias"].chunk(3))):
        out[f"{dst}.self_attn.{qkv}_proj.weight"] = w
        out[f"{dst}.self_attn.{qkv}_proj.bias"] = b
    pairs = {"attn.out_proj": "self_attn.out_proj", "ln_1": "layer_norm1", "ln_2": "layer_norm2",
             "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}
    for a, b in pairs.items():
        for p in ("weight", "bias"):
            out[f"{dst}.{b}.{p}"] = sd[f"{src}.{a}.{p}"]
    return out


def _norm(sd: dict[str, Tensor], src: str, dst: str) -> dict[str, Tensor]:
    return {f"{dst}.{p}": sd[f"{src}.{p}"] for p in ("weight", "bias")}


def text_positions(sd: dict[str, Tensor]) -> Tensor:
    """The text position table the model really adds (Long-CLIP mixes two tables)."""
    pos = sd["positional_embedding"]
    if "positional_embedding_res" not in sd:
        return pos
    mixed = sd["positional_embedding_res"].clone()
    mixed[:LONGCLIP_KEEP] = pos[:LONGCLIP_KEEP]
    return mixed


def convert_state_dict(sd: dict[str, Tensor]):
    """(transformers CLIPConfig, state dict for CLIPModel) from an OpenAI-format state dict."""
    from transformers import CLIPConfig

    if "visual.proj" not in sd:
        raise ConversionError("only ViT image towers are supported (no 'visual.proj' found; "
                              "ResNet CLIPs have no transformers CLIPModel equivalent)")
    sd = {k: v.float() for k, v in sd.items() if isinstance(v, Tensor)}
    t_width, v_width = sd["ln_final.weight"].shape[0], sd["visual.conv1.weight"].shape[0]
    patch = sd["visual.conv1.weight"].shape[-1]
    grid = round((sd["visual.positional_embedding"].shape[0] - 1) ** 0.5)
    positions = text_positions(sd)
    t_layers, v_layers = _layers(sd, "transformer.resblocks"), _layers(
        sd, "visual.transformer.resblocks")
    config = CLIPConfig(
        text_config=dict(vocab_size=sd["token_embedding.weight"].shape[0], hidden_size=t_width,
                         intermediate_size=sd["transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
                         num_hidden_layers=t_layers, num_attention_heads=max(t_width // 64, 1),
                         max_position_embeddings=positions.shape[0], hidden_act="quick_gelu",
                         bos_token_id=0, eos_token_id=2, pad_token_id=1),
        vision_config=dict(
            hidden_size=v_width, num_hidden_layers=v_layers,
            intermediate_size=sd["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
            num_attention_heads=max(v_width // 64, 1), image_size=patch * grid,
            patch_size=patch, hidden_act="quick_gelu"),
        projection_dim=sd["text_projection"].shape[1])
    out = {
        "text_model.embeddings.token_embedding.weight": sd["token_embedding.weight"],
        "text_model.embeddings.position_embedding.weight": positions,
        "text_projection.weight": sd["text_projection"].t().contiguous(),
        "vision_model.embeddings.class_embedding": sd["visual.class_embedding"],
        "vision_model.embeddings.patch_embedding.weight": sd["visual.conv1.weight"],
        "vision_model.embeddings.position_embedding.weight": sd["visual.positional_embedding"],
        "visual_projection.weight": sd["visual.proj"].t().contiguous(),
        "logit_scale": sd.get("logit_scale", torch.tensor(2.6592)),
        **_norm(sd, "ln_final", "text_model.final_layer_norm"),
        **_norm(sd, "visual.ln_pre", "vision_model.pre_layrnorm"),
        **_norm(sd, "visual.ln_post", "vision_model.post_layernorm"),
    }
    for i in range(t_layers):
        out |= _block(sd, f"transformer.resblocks.{i}", f"text_model.encoder.layers.{i}")
    for i in range(v_layers):
        out |= _block(sd, f"visual.transformer.resblocks.{i}", f"vision_model.encoder.layers.{i}")
    return config, out


def convert_checkpoint(source: Path, out_dir: Path, tokenizer_dir: Path) -> Path:
    """Write a transformers CLIP folder from an OpenAI-format/Long-CLIP ``.pt`` file."""
    from transformers import CLIPModel

    try:
        obj = torch.load(source, map_location="cpu", weights_only=False)
    except Exception as exc:  # a TorchScript archive, a corrupt file, ...
        try:
            obj = torch.jit.load(str(source), map_location="cpu").state_dict()
        except Exception:
            raise ConversionError(f"{source}: not a readable checkpoint ({exc})") from None
    sd = obj.state_dict() if hasattr(obj, "state_dict") else obj.get("state_dict", obj)
    try:
        config, weights = convert_state_dict(sd)
    except KeyError as exc:
        raise ConversionError(f"{source}: not an OpenAI-format CLIP state dict (no {exc})") \
            from None
    model = CLIPModel(config)
    missing, unexpected = model.load_state_dict(weights, strict=False)
    missing = [k for k in missing if not k.endswith("position_ids")]
    if missing or unexpected:
        raise ConversionError(f"conversion incomplete: missing {missing[:3]}, unexpected "
                              f"{unexpected[:3]}")
    tokenizer_files = [tokenizer_dir / f for f in TOKENIZER_FILES if (tokenizer_dir / f).exists()]
    if not tokenizer_files:
        raise ConversionError(f"{tokenizer_dir}: no tokenizer files (tokenizer.json or "
                              f"vocab.json + merges.txt) to copy")
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    for f in tokenizer_files:
        shutil.copy(f, out_dir / f.name)
    size = config.vision_config.image_size
    (out_dir / "preprocessor_config.json").write_text(json.dumps({
        "do_resize": True, "size": {"shortest_edge": size}, "do_center_crop": True,
        "crop_size": {"height": size, "width": size}, "do_normalize": True,
        "image_mean": list(CLIP_MEAN), "image_std": list(CLIP_STD), "resample": 3,
        "image_processor_type": "CLIPImageProcessor"}, indent=2))
    return out_dir
