"""Quiet by default: pcd-ray's own lines reach the terminal, every other writer (Python or native, forwarded worker
lines included) reaches only the run's log file. Run in a child process: ``quiet`` takes over descriptors 1 and 2."""

from __future__ import annotations

import subprocess
import sys
import textwrap


def test_quiet_keeps_the_terminal_for_pcd_ray_and_logs_everything(tmp_path):
    log = tmp_path / "logs" / "run.log"
    code = textwrap.dedent(f"""
        import logging, os, sys
        from pcd_ray import console
        console.quiet({str(log)!r})
        console.setup_logging(False)
        console.say("== data: done in 1.0 s")
        console.say("a progress note", err=True)
        logging.getLogger("pcd_ray.sink").info("generate: 10 kept")
        logging.getLogger("ray.data").warning("a library warning")
        print("a library print")
        os.write(2, b"[core_worker.cc:1] E a native log line\\n")
        # What Ray's log monitor prints for worker lines: a prefix, colour codes, then the line.
        print("\\x1b[36m(RayTrainWorker pid=7)\\x1b[0m [train] step 2/4 (50%) loss 1.0")
        print("\\x1b[36m(RayTrainWorker pid=7)\\x1b[0m [2026] DeepSpeed info: banner")
        sys.stdout.flush()
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == ["== data: done in 1.0 s", "[train] step 2/4 (50%) loss 1.0"]
    assert out.stderr.splitlines() == ["a progress note", "generate: 10 kept"]
    text = log.read_text()
    for line in (
        "== data: done in 1.0 s",
        "generate: 10 kept",
        "a library warning",
        "a library print",
        "E a native log line",
        "[train] step 2/4",
        "DeepSpeed info: banner",
    ):
        assert line in text, line


def test_read_only_commands_leave_the_streams_alone(tmp_path):
    code = textwrap.dedent(f"""
        from pcd_ray.cli import main
        rc = main(["status", "--config", "local", "storage.root={tmp_path}"])
        import sys; print("rc", rc)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "rc 0" in out.stdout, out.stderr
    assert "data" in out.stdout and not (tmp_path / "logs").exists()


def test_long_lines_wrap_within_the_terminal_width_and_keep_every_word():
    from pcd_ray.console import WIDTH, fit

    line = "generate: 63927 kept -> runs/local/diffs, 73 rejected {'too_short': 73} -> runs/local/rejects; " * 3
    text = fit("short\n" + line.strip())
    lines = text.splitlines()
    assert lines[0] == "short" and len(lines) > 2 and max(map(len, lines)) <= WIDTH
    assert all(x.startswith("    ") for x in lines[2:])
    assert " ".join(x.strip() for x in lines[1:]).split() == line.split()
    path = "s3://bucket/" + "x" * 150
    assert fit(path) == path  # a word longer than a line stays whole


def test_an_unexpected_error_is_named_on_the_terminal_with_the_traceback_in_the_log(tmp_path):
    log = tmp_path / "logs" / "run.log"
    code = textwrap.dedent(f"""
        import sys
        from pcd_ray import cli, console

        def run(args):
            console.quiet({str(log)!r})
            raise RuntimeError("something broke")

        cli.run = run
        sys.exit(cli.main(["status", "--config", "local"]))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 1
    lines = out.stderr.strip().splitlines()
    assert lines[-2:] == ["pcd-ray: RuntimeError: something broke", f"The traceback is in {log}"]
    assert "Traceback (most recent call last)" in log.read_text() and "Traceback" not in out.stderr
