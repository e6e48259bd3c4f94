"""OpenAI-format CLIP / Long-CLIP state dicts convert to transformers and compute the same
function: checked against a plain-torch forward written from OpenAI's architecture."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

from cliper_prod.commands import cli
from cliper_prod.features.clip_towers import ClipTowers
from cliper_prod.features.convert_clip import convert_state_dict

WIDTH, LAYERS, VOCAB, DIM, PATCH, GRID = 64, 2, 50, 32, 8, 4


def openai_state_dict(context: int, long_clip: bool) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)

    def r(*shape: int, scale: float = 0.1) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * scale

    sd = {"token_embedding.weight": r(VOCAB, WIDTH), "positional_embedding": r(context, WIDTH),
          "ln_final.weight": 1 + r(WIDTH), "ln_final.bias": r(WIDTH),
          "text_projection": r(WIDTH, DIM), "logit_scale": torch.tensor(4.6),
          "visual.class_embedding": r(WIDTH), "visual.conv1.weight": r(WIDTH, 3, PATCH, PATCH),
          "visual.positional_embedding": r(GRID * GRID + 1, WIDTH),
          "visual.ln_pre.weight": 1 + r(WIDTH), "visual.ln_pre.bias": r(WIDTH),
          "visual.ln_post.weight": 1 + r(WIDTH), "visual.ln_post.bias": r(WIDTH),
          "visual.proj": r(WIDTH, DIM)}
    if long_clip:
        sd["positional_embedding_res"] = r(context, WIDTH)
    for prefix in ("transformer", "visual.transformer"):
        for i in range(LAYERS):
            p = f"{prefix}.resblocks.{i}"
            sd |= {f"{p}.attn.in_proj_weight": r(3 * WIDTH, WIDTH),
                   f"{p}.attn.in_proj_bias": r(3 * WIDTH),
                   f"{p}.attn.out_proj.weight": r(WIDTH, WIDTH), f"{p}.attn.out_proj.bias": r(WIDTH),
                   f"{p}.ln_1.weight": 1 + r(WIDTH), f"{p}.ln_1.bias": r(WIDTH),
                   f"{p}.ln_2.weight": 1 + r(WIDTH), f"{p}.ln_2.bias": r(WIDTH),
                   f"{p}.mlp.c_fc.weight": r(4 * WIDTH, WIDTH), f"{p}.mlp.c_fc.bias": r(4 * WIDTH),
                   f"{p}.mlp.c_proj.weight": r(WIDTH, 4 * WIDTH),
                   f"{p}.mlp.c_proj.bias": r(WIDTH)}
    return sd


def _resblocks(sd: dict, prefix: str, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """OpenAI's ResidualAttentionBlock stack (sequence-first MultiheadAttention, QuickGELU)."""
    for i in range(LAYERS):
        p = f"{prefix}.resblocks.{i}"
        attn = torch.nn.MultiheadAttention(WIDTH, WIDTH // 64)
        attn.load_state_dict({"in_proj_weight": sd[f"{p}.attn.in_proj_weight"],
                              "in_proj_bias": sd[f"{p}.attn.in_proj_bias"],
                              "out_proj.weight": sd[f"{p}.attn.out_proj.weight"],
                              "out_proj.bias": sd[f"{p}.attn.out_proj.bias"]})
        h = F.layer_norm(x, (WIDTH,), sd[f"{p}.ln_1.weight"], sd[f"{p}.ln_1.bias"])
        x = x + attn(h, h, h, need_weights=False, attn_mask=mask)[0]
        h = F.layer_norm(x, (WIDTH,), sd[f"{p}.ln_2.weight"], sd[f"{p}.ln_2.bias"])
        h = F.linear(h, sd[f"{p}.mlp.c_fc.weight"], sd[f"{p}.mlp.c_fc.bias"])
        h = h * torch.sigmoid(1.702 * h)
        x = x + F.linear(h, sd[f"{p}.mlp.c_proj.weight"], sd[f"{p}.mlp.c_proj.bias"])
    return x


def openai_encode_text(sd: dict, tokens: torch.Tensor) -> torch.Tensor:
    n = tokens.shape[1]
    pos = sd["positional_embedding"]
    if "positional_embedding_res" in sd:  # Long-CLIP: mask1 keeps rows < 20, mask2 the rest
        keep = (torch.arange(n) < 20).float()[:, None]
        pos = pos * keep + sd["positional_embedding_res"] * (1 - keep)
    x = (sd["token_embedding.weight"][tokens] + pos).permute(1, 0, 2)
    causal = torch.full((n, n), float("-inf")).triu(1)
    x = _resblocks(sd, "transformer", x, causal).permute(1, 0, 2)
    x = F.layer_norm(x, (WIDTH,), sd["ln_final.weight"], sd["ln_final.bias"])
    return x[torch.arange(len(tokens)), tokens.argmax(-1)] @ sd["text_projection"]


def openai_encode_image(sd: dict, pixels: torch.Tensor) -> torch.Tensor:
    x = F.conv2d(pixels, sd["visual.conv1.weight"], stride=PATCH).flatten(2).permute(0, 2, 1)
    cls = sd["visual.class_embedding"].expand(len(x), 1, -1)
    x = torch.cat([cls, x], 1) + sd["visual.positional_embedding"]
    x = F.layer_norm(x, (WIDTH,), sd["visual.ln_pre.weight"], sd["visual.ln_pre.bias"])
    x = _resblocks(sd, "visual.transformer", x.permute(1, 0, 2), None).permute(1, 0, 2)
    x = F.layer_norm(x[:, 0], (WIDTH,), sd["visual.ln_post.weight"], sd["visual.ln_post.bias"])
    return x @ sd["visual.proj"]


@pytest.mark.parametrize("context, long_clip", [(77, False), (248, True)])
def test_converted_model_matches_the_source_forward(context: int, long_clip: bool) -> None:
    from transformers import CLIPModel

    sd = openai_state_dict(context, long_clip)
    config, weights = convert_state_dict(sd)
    model = CLIPModel(config).eval()
    missing, unexpected = model.load_state_dict(weights, strict=False)
    assert not unexpected and all(k.endswith("position_ids") for k in missing)
    assert config.text_config.max_position_embeddings == context
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(1, VOCAB - 1, (3, context), generator=g)
    tokens[:, 0] = 0
    tokens[torch.arange(3), torch.tensor([5, 30, context - 1])] = VOCAB - 1  # end of text
    pixels = torch.randn(2, 3, PATCH * GRID, PATCH * GRID, generator=g)
    with torch.no_grad():
        text = model.text_projection(model.text_model(input_ids=tokens).pooler_output)
        image = model.visual_projection(model.vision_model(pixel_values=pixels).pooler_output)
        torch.testing.assert_close(text, openai_encode_text(sd, tokens), atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(image, openai_encode_image(sd, pixels), atol=1e-4, rtol=1e-4)


def test_convert_clip_cli_writes_a_loadable_folder(tmp_path: Path) -> None:
    from cliper_prod.features.tiny_clip import build_tiny_clip

    tok_dir = build_tiny_clip(tmp_path / "tok", ["a red bottle"])
    sd = openai_state_dict(248, long_clip=True)
    torch.save(sd, tmp_path / "longclip.pt")
    out = tmp_path / "hf"
    res = CliRunner().invoke(cli, ["convert-clip", str(tmp_path / "longclip.pt"), "--out",
                                   str(out), "--tokenizer", str(tok_dir)])
    assert res.exit_code == 0, res.output
    towers = ClipTowers(out)
    assert towers.max_tokens == 248 and towers.dim == DIM
    pixels = np.random.default_rng(0).standard_normal((1, 3, 32, 32)).astype(np.float32)
    np.testing.assert_allclose(towers.encode_images(pixels),
                               openai_encode_image(sd, torch.from_numpy(pixels)).detach().numpy(),
                               atol=1e-4)
    (tmp_path / "junk.pt").write_bytes(b"junk")
    res = CliRunner().invoke(cli, ["convert-clip", str(tmp_path / "junk.pt"), "--out",
                                   str(tmp_path / "x"), "--tokenizer", str(tok_dir)])
    assert res.exit_code == 6 and "not a readable checkpoint" in res.stderr
