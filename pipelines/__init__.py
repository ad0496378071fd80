"""The diffusers pipeline of diffmoe_hf (this top-level folder installs as `diffmoe_hf.pipelines`).

`ClassConditionalMoEPipeline` samples class-conditional images from any of the package's transformers with standard
diffusers schedulers; what a model's timestep and output mean comes from its `config.formulation`
(`diffmoe_hf.formulations`). Its LoRA methods come from `lora_loading.TransformerLoraLoaderMixin` (the transformer
is the only LoRA-able component).
"""

from .pipeline_class_conditional_moe import ClassConditionalMoEPipeline
