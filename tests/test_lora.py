"""LoRA on every family through the pipeline's TransformerLoraLoaderMixin (CONVENTIONS section 5): targets from the training
script, save_lora_weights -> load_lora_weights round trip, adapter weights, fuse and unload."""

import pytest
import torch
from diffusers.training_utils import _collate_lora_metadata
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict

from diffmoe_hf import ClassConditionalMoEPipeline
from diffmoe_hf.training.train_class_conditional import LORA_LAYER_KINDS, lora_target_modules

from .helpers import assert_float32_close, model_float32_tolerance, registered_families
from .training_helpers import NUM_CLASSES, save_tiny_pipeline


def _output(transformer, **kwargs):
    config = transformer.config
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, config.in_channels, config.sample_size, config.sample_size, generator=generator)
    t = torch.tensor([10, 500]) if config.formulation == "ddpm-learned-sigma" else torch.tensor([0.3, 0.8])
    with torch.no_grad():
        return transformer(x, t, torch.tensor([0, NUM_CLASSES - 1]), **kwargs).sample


@pytest.mark.parametrize("family", registered_families())
def test_lora_round_trip(family, tmp_path):
    folder = save_tiny_pipeline(str(tmp_path / "pipe"), family)
    pipe = ClassConditionalMoEPipeline.from_pretrained(folder)
    transformer = pipe.transformer.eval()
    base = _output(transformer)
    targets = lora_target_modules(transformer, list(LORA_LAYER_KINDS))
    transformer.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=targets))
    wrapped = [name for name, module in transformer.named_modules() if hasattr(module, "lora_A")]
    assert any(".attn.to_q" in n for n in wrapped) and any(".ff.experts." in n for n in wrapped)
    assert not any(n.endswith(".router") or "capacity_predictor" in n for n in wrapped)
    with torch.no_grad():  # "train" the adapter
        for name, parameter in transformer.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.2)
    trained = _output(transformer)
    # fused weights W + BA round once more per weight than the separate W and BA paths: one more level of depth
    tolerance = model_float32_tolerance(transformer, trained, calls=2)
    assert (trained - base).abs().max() > tolerance

    ClassConditionalMoEPipeline.save_lora_weights(
        str(tmp_path / "lora"),
        transformer_lora_layers=get_peft_model_state_dict(transformer),
        **_collate_lora_metadata({"transformer": transformer}),
    )
    fresh = ClassConditionalMoEPipeline.from_pretrained(folder)
    fresh.load_lora_weights(str(tmp_path / "lora"), adapter_name="trained")
    reloaded = fresh.transformer.eval()
    assert_float32_close(_output(reloaded), trained, tolerance)

    fresh.set_adapters("trained", 0.5)
    half = _output(reloaded)
    assert (half - trained).abs().max() > tolerance and (half - base).abs().max() > tolerance
    fresh.set_adapters("trained", 1.0)
    fresh.fuse_lora()
    assert_float32_close(_output(reloaded), trained, tolerance)
    fresh.unfuse_lora()
    fresh.unload_lora_weights()
    assert_float32_close(_output(fresh.transformer), base, tolerance)


def test_lora_layer_kinds_select_their_modules():
    from .training_helpers import tiny_transformer

    transformer = tiny_transformer("dsmoe")
    attention = lora_target_modules(transformer, ["attention"])
    assert (
        attention == r"transformer_blocks\.\d+\.attn\.to_k|transformer_blocks\.\d+\.attn\.to_out\.0|"
        r"transformer_blocks\.\d+\.attn\.to_q|transformer_blocks\.\d+\.attn\.to_v"
    )
    shared = lora_target_modules(transformer, ["shared_experts"])
    assert "shared_experts" in shared and "experts\\.\\d+" not in shared
    with pytest.raises(ValueError, match="no layers"):
        lora_target_modules(tiny_transformer("diff-moe"), ["dense_ff"])  # every Diff-MoE block has experts
