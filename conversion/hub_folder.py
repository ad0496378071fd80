"""Writing a converted pipeline as a Hub-ready folder: all-or-nothing, optional remote-code layout, model card, push."""

import json
import os
import shutil
import tempfile

import torch

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
HUB_LAYOUTS = ("package", "remote_code")


def check_output_dir(output_dir: str, overwrite: bool) -> None:
    """Refuses an existing non-empty output folder unless `overwrite` (checked before any work is done)."""
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise FileExistsError(f"{output_dir} exists and is not a folder.")
    if os.path.isdir(output_dir) and os.listdir(output_dir) and not overwrite:
        raise FileExistsError(f"{output_dir} already exists and is not empty; pass --overwrite to replace it.")


def cast_for_saving(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """Casts `model`'s floating-point tensors to `dtype`, except inside the modules named in
    `_keep_in_fp32_modules` (routers), which stay float32."""
    keep = set(getattr(model, "_keep_in_fp32_modules", None) or [])
    for name, module in model.named_modules():
        if not keep.intersection(name.split(".")):
            module._apply(lambda t: t.to(dtype) if t.is_floating_point() else t, recurse=False)
    return model


def apply_hub_layout(folder: str, layout: str) -> None:
    """
    `"package"` (default): `model_index.json` names the installed `diffmoe_hf` modules; load with
    `ClassConditionalMoEPipeline.from_pretrained`. `"remote_code"`: adds one-line shim modules and points
    `model_index.json` at them, so `DiffusionPipeline.from_pretrained(repo, trust_remote_code=True)` works too (every
    loader then needs `trust_remote_code=True`; pin a `revision`).
    """
    if layout not in HUB_LAYOUTS:
        raise ValueError(f"hub layout must be one of {HUB_LAYOUTS}, got {layout!r}.")
    if layout == "package":
        return
    index_path = os.path.join(folder, "model_index.json")
    with open(index_path, encoding="utf-8") as f:
        index = json.load(f)
    shims = {".": (index["_class_name"], "diffmoe_hf.pipelines")}
    for component, value in index.items():
        if isinstance(value, list) and len(value) == 2 and str(value[0]).startswith("diffmoe_hf"):
            shims[component] = (value[1], value[0])
    for component, (class_name, module_path) in shims.items():
        shim_name = module_path.rsplit(".", 1)[-1] if component != "." else "pipeline_class_conditional_moe"
        with open(os.path.join(folder, component, f"{shim_name}.py"), "w", encoding="utf-8") as f:
            f.write(f"from {module_path} import {class_name}  # noqa: F401  (needs `pip install diffmoe-hf`)\n")
        if component == ".":
            index["_class_name"] = [shim_name, class_name]
        else:
            index[component] = [shim_name, class_name]
    with open(index_path, "w", encoding="utf-8") as f:
        json.dump(index, f, indent=2, sort_keys=True)


def save_folder_atomically(pipeline, output_dir: str, overwrite: bool, max_shard_size: str, extra_files: dict,
                           hub_layout: str = "package") -> None:  # fmt: skip
    """
    Saves `pipeline` (safetensors, sharded at `max_shard_size`) plus `extra_files` (`{relative path: text}`) into a
    temporary sibling folder and moves it to `output_dir` only once complete; a failure leaves no partial folder and an
    existing `output_dir` (with `overwrite`) is replaced only at the very end.
    """
    check_output_dir(output_dir, overwrite)
    parent = os.path.dirname(os.path.abspath(output_dir))
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{os.path.basename(output_dir)}.partial-", dir=parent)
    try:
        pipeline.save_pretrained(staging, safe_serialization=True, max_shard_size=max_shard_size)
        for relative_path, text in extra_files.items():
            with open(os.path.join(staging, relative_path), "w", encoding="utf-8") as f:
                f.write(text)
        apply_hub_layout(staging, hub_layout)
        if os.path.isdir(output_dir):
            previous = tempfile.mkdtemp(prefix=f".{os.path.basename(output_dir)}.previous-", dir=parent)
            os.rmdir(previous)
            os.replace(output_dir, previous)
            os.replace(staging, output_dir)
            shutil.rmtree(previous)
        else:
            os.replace(staging, output_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def push_folder_to_hub(folder: str, repo_id: str, token: str | None = None, private: bool = False) -> str:
    """Creates `repo_id` if needed and uploads `folder`; returns the commit URL."""
    from huggingface_hub import create_repo, upload_folder

    create_repo(repo_id, token=token, private=private, exist_ok=True, repo_type="model")
    info = upload_folder(repo_id=repo_id, folder_path=folder, token=token, commit_message="Upload converted model")
    return getattr(info, "commit_url", str(info))
