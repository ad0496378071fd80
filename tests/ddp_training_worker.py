"""Runs `train_class_conditional.main` under torchrun and writes every rank's final transformer state to
`<output_dir>/rank<r>.safetensors` (used by tests/test_training.py to compare the ranks)."""

import os
import sys

from safetensors.torch import save_file

from diffmoe_hf.training import train_class_conditional as script


original_save_final = script.save_final


def save_final_and_dump(accelerator, transformer, model, *rest):
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, os.path.join(rest[-3].output_dir, f"rank{accelerator.process_index}.safetensors"))
    original_save_final(accelerator, transformer, model, *rest)


if __name__ == "__main__":
    script.save_final = save_final_and_dump
    script.main(script.parse_args(sys.argv[1:]))
