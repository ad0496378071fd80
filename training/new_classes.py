"""Fine-tuning a pretrained class-conditional model on classes it does not have (`--new_classes replace|append`).

Every family conditions on `model.embedding.class_embedder.embedding_table`, an `nn.Embedding` of `num_classes` rows
plus, where the model has one, the null (unconditional) row last, which classifier-free guidance and label dropout use.
Changing the classes rebuilds that table: each new class row is copied from an old class row (the class of the same
name, or the one `--init_class_from new=old` names) or starts at the mean of the old class rows, and the null row is
copied to the new last position, so guidance keeps working. Nothing else in the model depends on the class count.

- `replace`: the model's classes become exactly the data's, numbered 0..n-1 in the data's (sorted) order.
- `append`: the model keeps its classes 0..N-1 and their rows untouched (their outputs do not change); data classes
  named like one of them train that class, the others become classes N, N+1, ...
"""

from dataclasses import dataclass

import torch
from torch import nn

from diffmoe_hf.cli import CommandError
from diffmoe_hf.training.data import class_name_ids


NEW_CLASS_MODES = ("replace", "append")


@dataclass(frozen=True)
class ClassPlan:
    """
    The classes of the fine-tuned model.

    Attributes:
        sources: For each new class id, the old class id whose embedding row it starts from; None: the mean of the old
            class rows.
        id2label: The new model's class names (`{"0": name, ...}`; old classes without a name have no entry).
        data_ids: Each class name of the data -> its new class id.
    """

    sources: list[int | None]
    id2label: dict[str, str]
    data_ids: dict[str, int]

    @property
    def num_classes(self) -> int:
        return len(self.sources)


def parse_init_class_from(text: str | None) -> dict[str, str]:
    """`--init_class_from 'square=circle,star=3'` -> `{"square": "circle", "star": "3"}`; a `CommandError` for an entry
    that is not `new=old` or a new class given twice."""
    pairs = {}
    for entry in filter(None, (part.strip() for part in (text or "").split(","))):
        new, sep, old = (part.strip() for part in entry.partition("="))
        if not sep or not new or not old:
            raise CommandError(
                f"--init_class_from {text!r}: {entry!r} is not NEW=OLD; give e.g. square=circle (the new class square "
                "starts from the model's class circle; an old class id works too)."
            )
        if new in pairs:
            raise CommandError(f"--init_class_from {text!r}: the new class {new!r} is given twice.")
        pairs[new] = old
    return pairs


def _old_class(name: str, num_classes: int, synonyms: dict[str, set[int]]) -> int | None:
    """The old class id `name` denotes (digits: the id; else a unique class name), None when it denotes none.
    Raises `ValueError` for a name of several classes."""
    if name.isascii() and name.isdigit():
        return int(name) if int(name) < num_classes else None
    ids = synonyms.get(name, set())
    if len(ids) > 1:
        raise ValueError(f"{name!r} names the model's classes {sorted(ids)}: name it by one class id instead.")
    return next(iter(ids)) if ids else None


def plan_classes(
    mode: str,
    data_names: list[str],
    num_classes: int,
    id2label: dict[str, str] | None,
    init_from: dict[str, str] | None = None,
) -> ClassPlan:
    """
    The classes of a model of `num_classes` classes (named by `id2label`, if it has names) fine-tuned on data whose
    classes are `data_names` (folder names or a dataset's label names), in `mode` (see the module docstring).

    Args:
        init_from: `{new class: old class}` (`parse_init_class_from`): the old class (a name or id) whose row a new
            class starts from.

    Raises:
        `ValueError` naming a data class that is two old classes at once, two data classes of one old class, or an
        `init_from` entry that names no new class of the data or no class of the model.
    """
    if mode not in NEW_CLASS_MODES:
        raise ValueError(f"mode must be one of {NEW_CLASS_MODES}, got {mode!r}.")
    synonyms = class_name_ids(id2label)
    matched = {name: _old_class(name, num_classes, synonyms) for name in data_names}
    by_old = {}
    for name, old in matched.items():
        if old is not None:
            by_old.setdefault(old, []).append(name)
    for old, names in by_old.items():
        if len(names) > 1:
            raise ValueError(f"The data classes {', '.join(names)} are all the model's class {old}: merge them.")

    if mode == "replace":
        new_names = list(data_names)
        sources = [matched[name] for name in data_names]
        id2label_out, data_ids = {}, {}
    else:
        new_names = [name for name in data_names if matched[name] is None]
        sources = list(range(num_classes)) + [None] * len(new_names)
        id2label_out = {str(i): label for i, label in (id2label or {}).items() if int(i) < num_classes}
        data_ids = {name: old for name, old in matched.items() if old is not None}
    first_new = len(sources) - len(new_names)
    for offset, name in enumerate(new_names):
        data_ids[name] = first_new + offset
        id2label_out[str(first_new + offset)] = name

    for new, old in (init_from or {}).items():
        if new not in data_ids or (mode == "append" and data_ids[new] < num_classes):
            raise ValueError(
                f"--init_class_from {new}={old}: {new!r} is no new class of the data (its new classes: "
                f"{', '.join(new_names) or 'none'})."
            )
        source = _old_class(old, num_classes, synonyms)
        if source is None:
            raise ValueError(
                f"--init_class_from {new}={old}: {old!r} is no class of the model (give one of its class names or an "
                f"id in 0..{num_classes - 1})."
            )
        sources[data_ids[new]] = source
    return ClassPlan(sources, dict(sorted(id2label_out.items(), key=lambda item: int(item[0]))), data_ids)


def has_null_class(model: nn.Module) -> bool:
    """Whether the class table of `model` holds the null (guidance) row after its `num_classes` class rows."""
    embedder = model.embedding.class_embedder
    return embedder.embedding_table.num_embeddings == embedder.num_classes + 1


@torch.no_grad()
def resize_class_embedding(model: nn.Module, sources: list[int | None]) -> None:
    """
    Rebuilds the class table of `model` (any family) for `len(sources)` classes: row i is a copy of old row
    `sources[i]` or, for None, the mean of the old class rows (null row excluded); the null row, if the model has one,
    is copied to the last position. Updates `num_classes` of the label embedder and of the model config.
    """
    embedder = model.embedding.class_embedder
    old_table = embedder.embedding_table
    num_old = embedder.num_classes
    old = old_table.weight
    mean = old[:num_old].mean(0)
    rows = [old[source] if source is not None else mean for source in sources]
    if has_null_class(model):
        rows.append(old[num_old])
    table = nn.Embedding(len(rows), old.shape[1], device=old.device, dtype=old.dtype)
    table.weight.copy_(torch.stack(rows))
    table.weight.requires_grad_(old.requires_grad)
    embedder.embedding_table = table
    embedder.num_classes = len(sources)
    model.register_to_config(num_classes=len(sources))
