"""The process template LocalSwarm forks its processes from: children behave as `python -m shardnet`
children would (exit codes, signals, their own session, stdout), and nothing outlives the launcher."""

from __future__ import annotations

import os
import signal
import subprocess

import psutil
import pytest

from shardnet.process_template import UNKNOWN_EXIT, TemplateProcess, supported

from .conftest import left_after_launcher_killed

pytestmark = pytest.mark.skipif(not supported(), reason="the process template forks: Linux only")


def _env() -> dict[str, str]:
    return dict(os.environ, PYTHONUNBUFFERED="1")


def test_forked_commands_answer_like_child_processes(tmp_path):
    template = TemplateProcess.shared()
    # Its own session: Ctrl-C at the launcher's terminal (SIGINT to the foreground group) misses it.
    assert os.getsid(template.process.pid) == template.process.pid
    key = tmp_path / "swarm.key"
    keygen = template.spawn(["keygen", str(key)], _env(), tmp_path / "keygen.log")
    assert keygen.wait(timeout=60) == 0 and key.is_file()
    assert "wrote a new swarm key" in (tmp_path / "keygen.log").read_text()

    bad = template.spawn(
        ["serve", "--model", str(tmp_path / "nope"), "--blocks", "0:1"], _env(), tmp_path / "bad.log"
    )
    assert bad.wait(timeout=60) == 2
    assert (tmp_path / "bad.log").read_text().splitlines() == [
        f"shardnet serve: error: model folder '{tmp_path / 'nope'}' does not exist or is not a directory"
    ]

    dht = template.spawn(
        ["dht", "--host", "127.0.0.1", "--port", "0"], _env(), tmp_path / "dht.log", stdout_pipe=True
    )
    assert dht.stdout.readline().startswith("/ip4/127.0.0.1/tcp/")
    assert dht.poll() is None and os.getsid(dht.pid) == dht.pid  # running, in a session of its own
    assert psutil.Process(dht.pid).ppid() == template.process.pid
    with pytest.raises(subprocess.TimeoutExpired):
        dht.wait(timeout=0.2)
    dht.terminate()
    assert dht.wait(timeout=60) == 0  # SIGTERM: a clean stop
    dht.stdout.close()

    victim = template.spawn(["dht", "--host", "127.0.0.1", "--port", "0"], _env(), None, stdout_pipe=True)
    victim.stdout.readline()
    victim.kill()
    assert victim.wait(timeout=60) == -signal.SIGKILL and victim.returncode == -signal.SIGKILL
    victim.send_signal(signal.SIGTERM)  # after its exit: nothing to signal, no error
    victim.stdout.close()


def test_children_of_a_template_that_died_still_end_and_wait_returns(tmp_path):
    """A template killed outright: its children get SIGTERM and stop; waiting on them does not hang (their
    exit status cannot be known then)."""
    template = TemplateProcess()  # not the shared one: this test kills it
    dht = template.spawn(["dht", "--host", "127.0.0.1", "--port", "0"], _env(), None, stdout_pipe=True)
    dht.stdout.readline()
    template.process.kill()
    assert dht.wait(timeout=60) == UNKNOWN_EXIT and dht.poll() == UNKNOWN_EXIT
    dht.stdout.close()


_LAUNCHER = """
import sys, time
from shardnet.launch import LocalSwarm
from shardnet.process_template import TemplateProcess
swarm = LocalSwarm(sys.argv[1], [(0, 6)], torch_threads=1).start(timeout_s=180)
processes = [TemplateProcess.shared().process, swarm.dht_process, *swarm.servers]
print(" ".join(str(p.pid) for p in processes), flush=True)
time.sleep(600)
"""


@pytest.mark.slow  # the default suite must stay under 10 minutes: README "Tests" says what covers it
def test_the_template_and_its_children_end_with_their_launcher(llama_untied):
    """SIGKILL of the process that started a swarm (nothing of it can clean up): the template dies with
    it, and its children (a DHT node and a server, each in a session of its own) stop as they would."""
    alive = left_after_launcher_killed(_LAUNCHER, str(llama_untied), count=3)
    assert not alive, f"left running after the launcher died: {[p.name() for p in alive]}"
