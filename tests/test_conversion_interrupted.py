"""Converter runs killed (SIGKILL) or interrupted (SIGINT) at the dangerous moments, and what the next run does.

Each converter runs in a subprocess that sends the signal to itself at an exact point of the folder swap (hooked on
`os.replace`), so the kill is real and the moment deterministic.
"""

import os
import signal
import subprocess
import sys

import pytest

from diffmoe_hf.cli import main

from .helpers import dsmoe_case


CASE = dsmoe_case()
CONVERT = [
    "convert",
    "dsmoe",
    "--checkpoint",
    os.path.join(CASE, "checkpoint.pt"),
    "--config",
    os.path.join(CASE, "config.yaml"),
]

# moments: "kill-before-move-in": SIGKILL when the finished folder is about to be moved to --output;
# "interrupt-after-move-aside": SIGINT right after --overwrite moved the old folder aside;
# "interrupt-before-removal": SIGINT once the new folder is in place, before the old one is deleted
CONVERTER_WITH_SIGNAL = """
import os, signal, sys
from diffmoe_hf.cli import main

moment, output = sys.argv[1], sys.argv[2]
move = os.replace

def replace(source, destination):
    source, destination = os.fspath(source), os.fspath(destination)
    if moment == "kill-before-move-in" and ".partial-" in source and destination == output:
        os.kill(os.getpid(), signal.SIGKILL)
    move(source, destination)
    if (moment == "interrupt-after-move-aside" and ".previous-" in destination) or (
        moment == "interrupt-before-removal" and ".removing-" in destination
    ):
        os.kill(os.getpid(), signal.SIGINT)

os.replace = replace
sys.exit(main(sys.argv[3:]))
"""


def _convert_with_signal(moment: str, output, *extra) -> subprocess.CompletedProcess:
    command = [
        sys.executable,
        "-c",
        CONVERTER_WITH_SIGNAL,
        moment,
        str(output),
        *CONVERT,
        "--output",
        str(output),
        *extra,
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)


def _hidden_siblings(output) -> dict[str, list[str]]:
    names = sorted(os.listdir(output.parent))
    return {
        kind: [n for n in names if n.startswith(f".{output.name}.{kind}-")]
        for kind in ("partial", "previous", "removing")
    }


def _old_folder(output) -> None:
    output.mkdir()
    (output / "keep.txt").write_text("the user's previous model")


def test_killed_run_leaves_a_partial_folder_that_the_next_run_removes(tmp_path, capsys):
    output = tmp_path / "out"
    result = _convert_with_signal("kill-before-move-in", output)
    assert result.returncode == -signal.SIGKILL
    assert not output.exists() and len(_hidden_siblings(output)["partial"]) == 1
    assert main([*CONVERT, "--output", str(output)]) == 0
    err = capsys.readouterr().err
    assert "diffmoe convert: Removed" in err and "left behind by an interrupted conversion" in err
    assert (output / "model_index.json").is_file() and os.listdir(tmp_path) == ["out"]


def test_run_killed_during_overwrite_gets_the_old_folder_back(tmp_path, capsys):
    output = tmp_path / "out"
    _old_folder(output)
    result = _convert_with_signal("kill-before-move-in", output, "--overwrite")
    assert result.returncode == -signal.SIGKILL
    siblings = _hidden_siblings(output)
    assert not output.exists() and len(siblings["previous"]) == 1 and len(siblings["partial"]) == 1
    # the next run puts the old folder back before it looks at --output, so without --overwrite it refuses
    assert main([*CONVERT, "--output", str(output)]) == 2
    err = capsys.readouterr().err
    assert f"Restored {output} from" in err and "already exists" in err and "--overwrite" in err
    assert (output / "keep.txt").read_text() == "the user's previous model" and os.listdir(tmp_path) == ["out"]


def test_interrupt_during_overwrite_puts_the_old_folder_back(tmp_path):
    output = tmp_path / "out"
    _old_folder(output)
    result = _convert_with_signal("interrupt-after-move-aside", output, "--overwrite")
    assert result.returncode != 0 and "KeyboardInterrupt" in result.stderr
    assert (output / "keep.txt").read_text() == "the user's previous model" and os.listdir(tmp_path) == ["out"]


def test_interrupt_while_deleting_the_old_folder_is_finished_by_the_next_run(tmp_path, capsys):
    output = tmp_path / "out"
    _old_folder(output)
    result = _convert_with_signal("interrupt-before-removal", output, "--overwrite")
    assert result.returncode != 0 and "KeyboardInterrupt" in result.stderr
    assert (output / "model_index.json").is_file() and not (output / "keep.txt").exists()  # the new folder is in
    assert len(_hidden_siblings(output)["removing"]) == 1
    assert main([*CONVERT, "--output", str(output), "--overwrite"]) == 0
    assert "Removed" in capsys.readouterr().err and os.listdir(tmp_path) == ["out"]


def test_folders_of_a_running_conversion_are_left_alone(tmp_path):
    from diffmoe_hf.conversion.hub_folder import recover_interrupted_save

    output = tmp_path / "out"
    writer = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        (tmp_path / f".out.partial-{writer.pid}-abc").mkdir()
        actions = recover_interrupted_save(str(output))
        assert len(actions) == 1 and f"process {writer.pid}) is still running" in actions[0]
        assert (tmp_path / f".out.partial-{writer.pid}-abc").is_dir()
    finally:
        writer.kill()
        writer.wait()
    assert recover_interrupted_save(str(output))[0].startswith("Removed") and os.listdir(tmp_path) == []


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_converted_folder_honours_the_umask(tmp_path, umask):
    previous = os.umask(umask)
    try:
        assert main([*CONVERT, "--output", str(tmp_path / "out")]) == 0
    finally:
        os.umask(previous)
    for root, folders, files in os.walk(tmp_path / "out"):
        assert os.stat(root).st_mode & 0o777 == 0o777 & ~umask, root
        for name in files:
            assert os.stat(os.path.join(root, name)).st_mode & 0o777 == 0o666 & ~umask, name
