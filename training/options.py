"""Checks of the training scripts' options, made before anything slow (loading a model, reading the data): a bad value
is a `CommandError` (the `diffmoe` command's one-line error, exit status 2) naming the option, the value and what to
do. Errors the data and checkpoint functions raise about the user's files are turned into the same error by
`user_input_errors`; anything else keeps its traceback.
"""

import contextlib
import json
import math
import os
import sys
import tempfile
from collections.abc import Callable, Iterator

from diffmoe_hf.cli import CommandError
from diffmoe_hf.families import get_family


# options that count something (of either script): at least 1 when given
COUNTS = (
    "batch_size",
    "shard_size",
    "num_classes",
    "train_batch_size",
    "num_train_epochs",
    "max_train_steps",
    "max_train_samples",
    "gradient_accumulation_steps",
    "checkpointing_steps",
    "checkpoints_total_limit",
    "resolution",
    "rank",
    "lora_alpha",
    "num_validation_images",
    "validation_inference_steps",
    "routing_log_steps",
    "lr_num_cycles",
)
# options where 0 means "none" / "off"
NON_NEGATIVE = ("lr_warmup_steps", "validation_epochs", "dataloader_num_workers", "seed")
# float options: (name, lowest, highest, whether the lowest is allowed)
FLOAT_RANGES = (
    ("learning_rate", 0.0, math.inf, False),
    ("adam_beta1", 0.0, 1.0, True),
    ("adam_beta2", 0.0, 1.0, True),
    ("adam_epsilon", 0.0, math.inf, True),
    ("adam_weight_decay", 0.0, math.inf, True),
    ("max_grad_norm", 0.0, math.inf, True),
    ("ema_decay", 0.0, 1.0, True),
    ("lora_dropout", 0.0, 1.0, True),
    ("aux_loss_coef", 0.0, math.inf, True),
    ("class_dropout_prob", 0.0, 1.0, True),
    ("logit_std", 0.0, math.inf, False),
    ("logit_mean", -math.inf, math.inf, True),
    ("lr_power", 0.0, math.inf, False),
    ("validation_guidance_scale", 0.0, math.inf, True),
)


def check_counts(args) -> None:
    for name in COUNTS:
        value = getattr(args, name, None)
        if value is not None and value < 1:
            raise CommandError(f"--{name} must be at least 1, got {value}.")
    for name in NON_NEGATIVE:
        value = getattr(args, name, None)
        if value is not None and value < 0:
            raise CommandError(f"--{name} must be 0 or more (0 turns it off), got {value}.")


def check_floats(args) -> None:
    for name, lowest, highest, lowest_allowed in FLOAT_RANGES:
        value = getattr(args, name, None)
        if value is None:
            continue
        too_low = value < lowest or (value == lowest and not lowest_allowed)
        if not math.isfinite(value) or too_low or value > highest:
            low = f"[{lowest}" if lowest_allowed else f"({lowest}"
            high = "inf)" if math.isinf(highest) else f"{highest}]"
            raise CommandError(f"--{name} must be a finite number in {low}, {high}, got {value}.")


def parse_class_ids(text: str, option: str) -> list[int]:
    """'0,1,207' -> [0, 1, 207]; a `CommandError` naming the entry that is not a class id."""
    ids = []
    for part in text.split(","):
        part = part.strip()
        if not (part.isascii() and part.isdigit()):
            raise CommandError(f"{option} {text!r}: {part!r} is not a class id; give class ids like 0,1,207.")
        ids.append(int(part))
    return ids


def check_preset(args) -> None:
    if args.preset is None:
        return
    presets = get_family(args.model_family).presets
    if args.preset not in presets:
        choose = (
            f"choose one of {', '.join(presets)}" if presets else "it has none: use --pretrained_model_name_or_path"
        )
        raise CommandError(f"--preset {args.preset!r} is no preset of {args.model_family}; {choose}.")
    if args.model_config_overrides:
        try:
            overrides = json.loads(args.model_config_overrides)
        except ValueError as error:
            raise CommandError(f"--model_config_overrides is not valid JSON ({error}).") from None
        if not isinstance(overrides, dict):
            raise CommandError(
                f"--model_config_overrides must be a JSON object like '{{\"num_classes\": 10}}', got {overrides!r}."
            )


def resolve_tracker(report_to: str | None) -> str:
    """--report_to checked: a tracker accelerate knows and that is installed, "all" or "none"; None (the default)
    means TensorBoard when it is installed, else none."""
    import accelerate.utils
    from accelerate.utils import LoggerType

    def installed(name: str) -> bool:
        return bool(getattr(accelerate.utils, f"is_{name}_available")())

    if report_to is None:
        return "tensorboard" if installed("tensorboard") else "none"
    if report_to in ("none", "all"):
        return report_to
    trackers = [kind.value for kind in LoggerType if kind != LoggerType.ALL]
    if report_to not in trackers:
        raise CommandError(f"--report_to {report_to!r} is unknown; choose one of none, all, {', '.join(trackers)}.")
    if not installed(report_to):
        raise CommandError(
            f"--report_to {report_to}: {report_to} is not installed; install it or pass --report_to none."
        )
    return report_to


def check_data_folder(option: str, path: str | None) -> None:
    if path is None:
        return
    if not os.path.exists(path):
        raise CommandError(f"{option} {path}: no such folder.")
    if not os.path.isdir(path):
        raise CommandError(f"{option} {path} is a file; give the folder that holds the training data.")


def check_output_dir(path: str) -> None:
    """`path` is a folder that exists and can be written, or one that can be created (nothing is created here)."""
    existing = os.path.abspath(path)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise CommandError(f"--output_dir {path}: {existing} is a file, not a folder; choose another --output_dir.")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as error:
        raise CommandError(
            f"--output_dir {path}: cannot write in {existing} ({error.strerror}); choose a writable --output_dir."
        ) from None


@contextlib.contextmanager
def user_input_errors() -> Iterator[None]:
    """Turns the `ValueError` / `OSError` raised in the block (by functions that check the user's data, model folder or
    checkpoints) into a `CommandError` with the same message."""
    try:
        yield
    except (ValueError, OSError) as error:
        if isinstance(error, OSError) and error.strerror and error.filename:
            raise CommandError(f"{error.strerror}: {error.filename}") from error
        raise CommandError(str(error)) from error


def run_script(
    script: str, parse_args: Callable, main: Callable, argv: list[str] | None, interrupted: Callable
) -> int:
    """
    Runs `main(parse_args(argv))` and returns the exit status: 0; 2 with one line on stderr for a `CommandError`;
    130 for Ctrl-C, with one line (from the main process) ending in `interrupted(args)`, which cleans up and says what
    was kept (`args` is None when the interruption came before the arguments were parsed).
    """
    args = None
    try:
        args = parse_args(argv)
        main(args)
    except CommandError as error:
        print(f"{script}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        from tqdm import tqdm

        for bar in list(tqdm._instances):  # closed now, so that they do not redraw after the message at exit
            bar.close()
        if int(os.environ.get("RANK", 0)) == 0:
            print(f"{script}: interrupted; {interrupted(args)}", file=sys.stderr)
        return 130
    return 0
