"""How much of the project one denoising step runs through: a one-step pipeline call traced with `sys.setprofile`.

    HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 python -m benchmarks.trace_pipeline_call [--model digits-dsmoe] [--json]

Loads a shipped model (`diffmoe_hf.default_models()`, default `digits-dsmoe`) with
`ClassConditionalMoEPipeline.from_pretrained` and samples one image of class 3 in ONE step with guidance on
(`guidance_scale=2.0`, so the conditional and the null-class pass both run), `output_type="np"`. Every Python module
is imported before tracing starts, so no module body is counted.

How it counts (the counts depend on the code and on the machine's expert-GEMM path, never on timing or threads: on an
x86 CPU with torch's MKL the experts run as one grouped GEMM, elsewhere one matmul per expert, other functions):

- A *project function* is a Python code object whose file lies under the repository root (`diffmoe_hf/`,
  `pipelines/`, `conversion/`, ... as installed by `pip install -e .`), this script excluded. Functions, methods,
  lambdas and the code objects Python 3.11 makes for comprehensions and generator expressions each count as one
  function, identified by (file, first line, name) and counted once however often it runs; `named functions`
  leaves out the comprehensions, generator expressions and lambdas. Code without a file (`<frozen abc>`,
  `<string>`: e.g. dataclass `__init__`s) is not project code.
- *Files*: the distinct files of those functions.
- *Switches*: along the sequence of the profiler's `"call"` events of project functions (every entry of a function,
  and every resumption of a generator), the number of consecutive pairs in different files. Calls into diffusers,
  torch or the standard library between two project calls are skipped, not counted as a file.
- Scopes: `load + call` traces `from_pretrained` and the call; `call` only `pipe(...)` (checks, latents, timesteps,
  the step, decoding); `denoising step` only the body of the denoising loop, i.e. the events after the pipeline's
  `progress_bar(...)` context is entered and before its `update()`.
"""

import argparse
import json
import os
import sys
from pathlib import Path

import torch


REPO_ROOT = Path(__file__).resolve().parent.parent
THIS_FILE = str(Path(__file__).resolve())
# code objects Python makes for expressions rather than `def` statements
GENERATED_CODE = ("<listcomp>", "<setcomp>", "<dictcomp>", "<genexpr>", "<lambda>")


class CallTrace:
    """
    Records the profiler's Python `"call"` events of project functions in order, each with the scope markers seen so
    far (`in_step` between the pipeline's progress bar starting and its first `update()`).
    """

    def __init__(self, root: Path):
        self.root = str(root) + os.sep
        self.calls = []  # (file, first line, name, in_step)
        self.in_step = False
        self._resolved = {}

    def _project_file(self, filename: str) -> str | None:
        if filename not in self._resolved:
            path = os.path.realpath(filename)  # "<frozen abc>", "<string>" (generated code) are not files
            inside = os.path.isfile(filename) and path.startswith(self.root) and path != THIS_FILE
            self._resolved[filename] = os.path.relpath(path, self.root) if inside else None
        return self._resolved[filename]

    def profile(self, frame, event, arg):
        if event == "c_call" or event == "c_return" or event == "c_exception":
            return
        code = frame.f_code
        if event == "return" and code.co_name == "progress_bar" and "pipeline_utils" in code.co_filename:
            self.in_step = True  # the pipeline's `with self.progress_bar(...)` starts the denoising loop
        elif event == "call" and code.co_name == "update" and self.in_step and "tqdm" in code.co_filename:
            self.in_step = False  # the first `progress_bar.update()` ends the (only) step
        if event != "call":
            return
        relative = self._project_file(code.co_filename)
        if relative is not None:
            self.calls.append((relative, code.co_firstlineno, code.co_qualname, self.in_step))


def summarize(calls: list[tuple]) -> dict:
    """Distinct functions, distinct files and file switches of a sequence of project calls."""
    files = [call[0] for call in calls]
    functions = {call[:3] for call in calls}
    return {
        "functions": len(functions),
        "named functions": sum(not name.endswith(GENERATED_CODE) for _, _, name in functions),
        "files": len(set(files)),
        "switches": sum(a != b for a, b in zip(files, files[1:])),
    }


def trace(model: str) -> tuple[dict, list[tuple]]:
    from diffmoe_hf import ClassConditionalMoEPipeline, default_models

    path = default_models()[model]
    # warm-up: import every module the traced code needs, so module bodies stay out of the counts
    warm = ClassConditionalMoEPipeline.from_pretrained(path)
    warm.set_progress_bar_config(disable=True)
    warm(class_labels=[3], num_inference_steps=1, guidance_scale=2.0, output_type="np")

    recorder = CallTrace(REPO_ROOT)
    sys.setprofile(recorder.profile)
    try:
        pipe = ClassConditionalMoEPipeline.from_pretrained(path)
        pipe.set_progress_bar_config(disable=True)
        call_start = len(recorder.calls)
        pipe(class_labels=[3], num_inference_steps=1, guidance_scale=2.0, output_type="np")
    finally:
        sys.setprofile(None)
    calls = recorder.calls
    counts = {
        "load + call": summarize(calls),
        "call": summarize(calls[call_start:]),
        "denoising step": summarize([call for call in calls if call[3]]),
    }
    return counts, calls


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="digits-dsmoe", help="a key of diffmoe_hf.default_models()")
    parser.add_argument("--json", action="store_true", help="print the counts as JSON")
    parser.add_argument("--list", action="store_true", help="also list the denoising step's functions by file")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.manual_seed(0)
    counts, calls = trace(args.model)
    if args.json:
        print(json.dumps({"model": args.model, **counts}, indent=2))
    else:
        print(f"{'scope':<16} {'functions':>9} {'named functions':>15} {'files':>6} {'switches':>9}")
        for scope, row in counts.items():
            print(
                f"{scope:<16} {row['functions']:>9} {row['named functions']:>15} {row['files']:>6} "
                f"{row['switches']:>9}"
            )
    if args.list:
        step_functions = sorted({call[:3] for call in calls if call[3]})
        for file, line, name in step_functions:
            print(f"  {file}:{line} {name}")


if __name__ == "__main__":
    main()
