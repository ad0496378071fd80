"""Model cards for converted folders."""


def render_model_card(
    card: dict, family: str, transformer, source: str, weights: str, dtype: str, hub_layout: str
) -> str:
    """
    Args:
        card: the family's card facts (`family`, `paper`, `paper_url`, `upstream`, `license`, `license_note`,
            `sampler`, `default_steps`, `default_guidance`, `results`; optional `experts`, a format string of
            `config` for the experts row when the family does not route k experts per token).
        family: the family id it was converted with (`diffmoe convert FAMILY`).
        transformer: the converted model (its config and parameter count go into the card).
        source: file name of the original checkpoint; weights: which weights were taken (`ema`, `model_ema1`, ...).
        dtype: saved dtype name; hub_layout: `"package"` or `"remote_code"`.
    """
    config = transformer.config
    total = sum(p.numel() for p in transformer.parameters())
    loader = (
        'from diffusers import DiffusionPipeline\n\npipe = DiffusionPipeline.from_pretrained("<repo-or-folder>", '
        "trust_remote_code=True)"
        if hub_layout == "remote_code"
        else "from diffmoe_hf import ClassConditionalMoEPipeline\n\n"
        'pipe = ClassConditionalMoEPipeline.from_pretrained("<repo-or-folder>")'
    )
    experts = card.get("experts", "{config.num_experts} routed, {config.num_experts_per_tok} per token")
    experts = experts.format(config=config)
    if config.get("moe_layers", True) == []:
        experts = "none (dense model)"
    labels = 'pipe.get_label_ids(["golden retriever"])' if config.num_classes == 1000 else "[0]"
    return f"""---
license: {card["license"]}
library_name: diffusers
tags:
- diffmoe_hf
- mixture-of-experts
- class-conditional
- image-generation
- {card["family"].lower()}
---

# {card["family"]} ({type(transformer).__name__})

Converted from an original {card["family"]} checkpoint (`{source}`, `{weights}` weights) with
`diffmoe-hf` (`diffmoe convert {family}`); saved in {dtype}.

- Paper: [{card["paper"]}]({card["paper_url"]})
- Original code: {card["upstream"]}
- License: {card["license"]}. {card["license_note"]}

## Usage

```bash
pip install diffmoe-hf
```

```python
import torch
{loader}
# pipe.vae must be set for latent models if this folder has no vae/ (e.g. AutoencoderKL "stabilityai/sd-vae-ft-mse")
image = pipe(class_labels={labels}, num_inference_steps={card["default_steps"]},
             guidance_scale={card["default_guidance"]}, generator=torch.manual_seed(0)).images[0]
```

## Model

| | |
|---|---|
| parameters | {total / 1e6:.1f}M |
| layers / width / heads | {config.num_layers} / {config.num_attention_heads * config.attention_head_dim} / {config.num_attention_heads} |
| experts | {experts} |
| input | {config.in_channels} x {config.sample_size} x {config.sample_size}, patch {config.patch_size} |
| classes | {config.num_classes} (null class id {config.num_classes}) |
| formulation | `{config.formulation}` |

## Sampler

{card["sampler"]}

## Results reported upstream

{card["results"]}
"""
