#!/usr/bin/env python
"""End-to-end demo on this machine: Clowder-style messages in, metadata out.

A Clowder stand-in serves some text files and their extraction messages are published to
RabbitMQ exactly as Clowder v1 publishes them. Then the product does its job: the launcher
(`scale --once`) reads the queue depth and submits an agent job array to the local Slurm
(pbs/agent_array.slurm) within the demo's site caps; the array tasks run the unchanged example
wordcount extractor until the queue is drained and exit by themselves (idle exit). Prints what
reached "Clowder" (metadata and status messages) and the launcher's status screen.

  python scripts/demo.py            # through the launcher and Slurm
  python scripts/demo.py --direct   # one agent process, no scheduler
  python scripts/demo.py --report DIR   # also write the launcher's run report (plots) to DIR
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
import uuid

import pika

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from devtools.clowder_standin import ClowderStandin  # noqa: E402

TEXTS = {
    "moby.txt": "Call me Ishmael. Some years ago, never mind how long precisely,\nhaving little or no money in my purse\n",
    "haiku.txt": "An old silent pond\nA frog jumps into the pond\nSplash! Silence again.\n",
    "lorem.txt": "lorem ipsum dolor sit amet\n" * 50,
}
TEXTS.update({f"numbers-{i:02d}.txt": " ".join(str(n) for n in range(i * 10)) + "\n" for i in range(1, 58)})
CAPS = """# Demo site caps: what a sysadmin allows the launcher (see launcher/README.md)
max_array_size: 4
max_running: 4
max_queued: 4
max_walltime: "00:30:00"
default_walltime: "00:10:00"
cores_per_task: 1
"""


def run_agent_directly(env: dict, progress: "Progress") -> int:
    proc = subprocess.Popen([sys.executable, "-m", "agent", "run", "--plugin", "ncsa.wordcount.hpc",
                             "--idle-exit", "3"], cwd=REPO, env=env)
    while proc.poll() is None:
        progress.show("one agent, no scheduler")
        time.sleep(1)
    return proc.returncode


class Progress:
    """Files done / total and the rate, on one line where a person waits."""

    def __init__(self, clowder: ClowderStandin, ids, started: float) -> None:
        self.clowder, self.ids, self.started, self.last = clowder, list(ids), started, None
        self.tty = sys.stdout.isatty()
        self.done, self.done_at = 0, started

    def show(self, note: str = "", final: bool = False) -> None:
        done = sum(1 for f in self.ids if self.clowder.metadata_for(f))
        if done != self.done:  # the rate is measured up to the latest file, not to the wait's end
            self.done, self.done_at = done, time.time()
        elapsed = max(self.done_at - self.started, 1e-6)
        line = f"progress: {done}/{len(self.ids)} files done, {60 * done / elapsed:.0f} files/min" + (
            f" ({note})" if note else "")
        if self.tty:
            print("\r" + line.ljust(78), end="\n" if final else "", flush=True)
        elif line != self.last or final:
            print(line, flush=True)
        self.last = line


def run_through_launcher(env: dict, work: str, progress: "Progress", report_dir: str = "") -> int:
    """launcher scale --once submits the array; wait until its tasks are gone."""
    caps = os.path.join(work, "caps.yaml")
    with open(caps, "w") as fh:
        fh.write(CAPS)
    os.chmod(caps, 0o644)
    env.update({"LAUNCHER_CAPS": caps, "LAUNCHER_STATE_DIR": os.path.join(work, "launcher"),
                "AGENT_PLUGIN": "ncsa.wordcount.hpc", "AGENT_IDLE_EXIT": "5",
                "AGENT_LOG_DIR": os.path.join(work, "logs"), "AGENT_JOURNAL_DIR": os.path.join(work, "journal")})
    launcher = [sys.executable, "-m", "launcher"]
    print("$ python -m launcher scale --once --files-per-task 20")
    code = subprocess.call(launcher + ["scale", "--once", "--files-per-task", "20"], cwd=REPO, env=env)
    if code != 0:
        return code
    deadline = time.time() + 300
    while time.time() < deadline:
        out = subprocess.run(launcher + ["status", "--json"], cwd=REPO, env=env, capture_output=True, text=True)
        tasks = json.loads(out.stdout or "{}").get("tasks", {}) if out.returncode == 0 else {}
        progress.show(f"array tasks: {tasks.get('queued', '?')} queued, {tasks.get('running', '?')} running")
        if out.returncode == 0 and not tasks.get("queued") and not tasks.get("running"):
            break
        time.sleep(2)
    progress.show("array finished", final=True)
    print("\n$ python -m launcher status")
    subprocess.call(launcher + ["status"], cwd=REPO, env=env)
    logs = sorted(os.listdir(os.path.join(work, "logs"))) if os.path.isdir(os.path.join(work, "logs")) else []
    print(f"\nagent logs (one per array task): {', '.join(logs) or 'none'}")
    if report_dir:
        print(f"\n$ python -m launcher report --out {report_dir}")
        subprocess.call(launcher + ["report", "--out", report_dir], cwd=REPO, env=env)
    return 0


def _report_dir() -> str:
    """``--report DIR``: also write the launcher's run report there (kept after the demo)."""
    argv = sys.argv[1:]
    if "--report" in argv and argv.index("--report") + 1 < len(argv):
        return os.path.abspath(argv[argv.index("--report") + 1])
    return ""


def main() -> int:
    url = os.environ.get("RABBITMQ_URI", "amqp://guest:guest@127.0.0.1:5672/%2f")
    queue = "ncsa.wordcount.hpc"
    reply = "demo.replies." + uuid.uuid4().hex[:6]
    with ClowderStandin() as clowder:
        conn = pika.BlockingConnection(pika.URLParameters(url))
        ch = conn.channel()
        ch.queue_declare(queue, durable=True)
        ch.queue_declare(reply, auto_delete=False)
        ids = {}
        for name, text in TEXTS.items():
            fid = clowder.add_file(name=name, content=text.encode(), dataset_id="demo-dataset")
            ids[fid] = name
            body = {"id": fid, "intermediateId": fid, "jobid": uuid.uuid4().hex, "host": clowder.url,
                    "secretKey": "secret", "fileSize": str(len(text)), "datasetId": "demo-dataset",
                    "filename": name, "routing_key": "clowder.file.text.plain", "flags": "", "parameters": {}}
            ch.basic_publish("", queue, json.dumps(body), pika.BasicProperties(
                delivery_mode=2, reply_to=reply, correlation_id=str(uuid.uuid4()), content_type="application/json"))
        print(f"published {len(ids)} extraction messages to queue {queue!r}")
        env = dict(os.environ, AGENT_PLUGIN_PATH=os.path.join(REPO, "examples"), RABBITMQ_URI=url,
                   RABBITMQ_QUEUE=queue)
        started = time.time()
        with tempfile.TemporaryDirectory(prefix="clowder-demo-") as work:
            progress = Progress(clowder, ids, started)
            code = run_agent_directly(env, progress) if "--direct" in sys.argv[1:] else run_through_launcher(
                env, work, progress, _report_dir())
            progress.show("finished", final=True)
        print(f"\nfinished with code {code} after {time.time() - started:.1f}s")
        shown = 0
        for fid, name in ids.items():
            for md in clowder.metadata_for(fid):
                if shown < 5:
                    print(f"  {name:15s} metadata from {md['agent']['name']}: {json.dumps(md['content'])}")
                shown += 1
        print(f"  ... metadata for {sum(1 for f in ids if clowder.metadata_for(f))} of {len(ids)} files")
        statuses = []
        while True:
            method, _props, body = ch.basic_get(reply, auto_ack=True)
            if method is None:
                break
            statuses.append(json.loads(body)["status"])
        done = sum(1 for s in statuses if s.startswith("StatusMessage.done"))
        print(f"\n{len(statuses)} status messages sent to Clowder, {done} of them DONE")
        ch.queue_delete(reply)
        conn.close()
        ok = code == 0 and all(clowder.metadata_for(f) for f in ids) and done == len(ids)
    print("demo: OK" if ok else "demo: FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
