"""io.lock: one writer per run folder; a second process is refused with the holder's pid; a killed
holder's lock is free again; nesting in one process goes on."""

import os
import signal
import subprocess
import sys
import time

import pytest
from fastrlhf.io.lock import RunLock, RunLockedError

HOLD = "import sys, time; from fastrlhf.io.lock import RunLock; RunLock(sys.argv[1]).acquire(); print('held', flush=True); time.sleep(60)"


def holder(run):
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(run)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_writer_is_refused_with_the_holders_pid_and_a_killed_holder_frees_the_folder(tmp_path):
    proc = holder(tmp_path / "run")
    try:
        with pytest.raises(RunLockedError, match=rf"being written by another process \(pid {proc.pid}: "):
            RunLock(tmp_path / "run").acquire()
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        proc.stdout.close()
    deadline = time.monotonic() + 5
    while True:  # the kernel releases a dead process's flock at once; allow for a slow reap
        try:
            lock = RunLock(tmp_path / "run").acquire()
            break
        except RunLockedError:
            assert time.monotonic() < deadline
            time.sleep(0.05)
    assert f"pid {os.getpid()}:" in (tmp_path / "run" / ".lock").read_text()
    lock.release()


def test_nested_locks_in_one_process_and_other_folders_go_on(tmp_path):
    with RunLock(tmp_path / "a"), RunLock(tmp_path / "a"), RunLock(tmp_path / "b"):
        proc = subprocess.run(
            [
                sys.executable,
                "-c",
                "import sys; from fastrlhf.io.lock import RunLock; RunLock(sys.argv[1]).acquire()",
                str(tmp_path / "a"),
            ],
            capture_output=True,
            text=True,
            check=False,
        )
        assert proc.returncode != 0 and "RunLockedError" in proc.stderr
    with RunLock(tmp_path / "a"):  # released on the way out of the block
        pass
