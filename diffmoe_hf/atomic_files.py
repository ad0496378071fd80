"""Writing a file all-or-nothing: into a hidden-by-name sibling first, moved onto the final name only once complete.

A killed or failing writer therefore never leaves half a file under the final name. The sibling is created with
`open` (or the writer's own call), so the file gets the permissions the umask gives, like any file the user creates.
Folder-level saves with their own staging (converted folders, training checkpoints) use `fsync_path` and
`apply_umask` from here.
"""

import contextlib
import os
import re
import tempfile
from collections.abc import Iterator


@contextlib.contextmanager
def written_atomically(path: str, suffix: str = "") -> Iterator[str]:
    """
    Yields the path of a temporary sibling of `path` (`PATH.partial-PID` + `suffix`, e.g. `".png"` for writers that
    pick the format from the extension) for the block to write; moves it onto `path` when the block finishes and
    removes it when the block raises.
    """
    partial = f"{path}.partial-{os.getpid()}{suffix}"
    try:
        yield partial
        os.replace(partial, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(partial)
        raise


def write_text_atomically(path: str, text: str) -> None:
    """Writes `text` (UTF-8) to `path` all-or-nothing (see `written_atomically`)."""
    with written_atomically(path) as partial, open(partial, "w", encoding="utf-8") as f:
        f.write(text)


def fsync_path(path: str) -> None:
    """Flushes a file, or a folder's entries (POSIX only; elsewhere folders are skipped), to disk."""
    if os.path.isdir(path) and os.name != "posix":
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def apply_umask(folder: str, skip: tuple[str, ...] = ()) -> None:
    """
    Gives `folder` and everything in it, except the top-level entries whose names fully match a regular expression of
    `skip`, the permissions of a folder (0o777) or file (0o666) the user creates, minus the umask: `tempfile.mkdtemp`
    makes 0o700 folders and the safetensors writer 0o600 files, which would lock other users out of a shared folder.
    """
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(folder, 0o777 & ~umask)
    for entry in os.listdir(folder):
        if any(re.fullmatch(pattern, entry) for pattern in skip):
            continue
        path = os.path.join(folder, entry)
        if not os.path.isdir(path):
            os.chmod(path, 0o666 & ~umask)
            continue
        for root, _, names in os.walk(path):
            os.chmod(root, 0o777 & ~umask)
            for name in names:
                os.chmod(os.path.join(root, name), 0o666 & ~umask)


def existing_folder_for(folder: str) -> str:
    """`folder` if it exists, else the closest existing path above it (where its missing folders would be created)."""
    existing = os.path.abspath(folder)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    return existing


def why_not_writable(folder: str) -> str | None:
    """
    None when new files can be created in `folder` (or, for a folder still to be made, in the closest existing folder
    above it), else why not, in words naming that folder. Probed by creating a file: the permission bits do not tell
    (root, read-only mounts).
    """
    existing = existing_folder_for(folder)
    if not os.path.isdir(existing):
        return f"{existing} is a file"
    try:
        handle, probe = tempfile.mkstemp(prefix=".diffmoe-write-check-", dir=existing)
        os.close(handle)
        os.remove(probe)
    except OSError as err:
        return f"the folder {existing} does not accept new files ({err.strerror})"
    return None
