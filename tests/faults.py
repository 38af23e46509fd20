"""Fault injection for the tests: a flaky HTTP proxy in front of the loopback S3 server, and
process-tree kills. Loopback only; every loop is bounded in count and time."""

from __future__ import annotations

import http.client
import os
import signal
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "proxy-connection"}


class FlakyProxy:
    """Forwards S3 requests to `upstream`; every `every`-th matching request fails.

    A failure is a 503 SlowDown answer or, alternately, a connection dropped without an
    answer. `permanent=True` fails every matching request.
    """

    def __init__(self, upstream: str, every: int = 4, methods=("GET", "PUT", "POST", "HEAD"), path_contains="",
                 permanent: bool = False, max_requests: int = 20000, lifetime_s: float = 900,
                 storm_s: float = 0.0, storm_after: int = 0):
        """`storm_s` > 0: no periodic faults; instead, once `storm_after` matching requests have been
        served, every matching request fails for `storm_s` seconds (a throttling storm), then none."""
        host, port = upstream.replace("http://", "").split(":")
        self.upstream = (host, int(port))
        assert host in ("127.0.0.1", "localhost")
        self.every, self.methods, self.path_contains, self.permanent = every, methods, path_contains, permanent
        self.max_requests, self.deadline = max_requests, time.time() + lifetime_s
        self.storm_s, self.storm_after = storm_s, storm_after
        self.storm_start: float | None = None
        self.failed_paths: set[str] = set()     # matching requests that were failed, by path
        self.recovered: set[str] = set()        # of those, the paths served later
        self.matching = 0
        self.count = self.failed = 0
        self.by_method: dict[str, int] = {}
        self.lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    data = b""
                    while True:
                        size = int(self.rfile.readline().strip().split(b";")[0], 16)
                        if size == 0:
                            self.rfile.readline()
                            return data
                        data += self.rfile.read(size)
                        self.rfile.readline()
                n = int(self.headers.get("Content-Length") or 0)
                return self.rfile.read(n) if n else b""

            def _handle(self):
                body = self._body()
                fault = proxy._fault(self.command, self.path)
                if fault == "drop":
                    self.close_connection = True
                    self.connection.shutdown(2)
                    return
                if fault == "503":
                    msg = b"<Error><Code>SlowDown</Code><Message>injected</Message></Error>"
                    self.send_response(503)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(msg)))
                    self.end_headers()
                    self.wfile.write(msg)
                    return
                conn = http.client.HTTPConnection(*proxy.upstream, timeout=60)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP}
                headers["Content-Length"] = str(len(body))
                conn.request(self.command, self.path, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                self.send_response(resp.status, resp.reason)
                for k, v in resp.getheaders():
                    if k.lower() not in _HOP and k.lower() != "content-length":
                        self.send_header(k, v)
                length = resp.getheader("Content-Length") if self.command == "HEAD" else str(len(data))
                self.send_header("Content-Length", length or "0")
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                conn.close()

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def _fault(self, method: str, path: str) -> str | None:
        with self.lock:
            self.count += 1
            self.by_method[method] = self.by_method.get(method, 0) + 1
            if self.count > self.max_requests or time.time() > self.deadline:
                raise RuntimeError("flaky proxy: request budget or lifetime exhausted")
            if method not in self.methods or self.path_contains not in path:
                return None
            self.matching += 1
            if self.storm_s > 0:
                if self.storm_start is None and self.matching > self.storm_after:
                    self.storm_start = time.time()
                if self.storm_start is None or time.time() > self.storm_start + self.storm_s:
                    return self._served(path)
                self.failed += 1
                self.failed_paths.add(path)
                return "drop" if self.failed % 3 == 0 else "503"
            if self.permanent or self.count % self.every == 0:
                self.failed += 1
                self.failed_paths.add(path)
                return "drop" if (self.failed % 2 == 0 and not self.permanent) else "503"
            return self._served(path)

    def _served(self, path: str) -> None:
        if path in self.failed_paths:
            self.recovered.add(path)
        return None

    def __enter__(self) -> FlakyProxy:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as fh:
                    ppid = int(fh.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            tree.setdefault(ppid, []).append(int(entry))
    return tree


def descendants(pid: int) -> list[int]:
    tree, out, todo = _children(), [], [pid]
    while todo:
        p = todo.pop()
        for c in tree.get(p, []):
            out.append(c)
            todo.append(c)
    return out


def kill_tree(pid: int) -> None:
    """SIGKILL a process and everything it started: what a crashed machine looks like."""
    for p in [pid, *descendants(pid)]:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass


def pids_with_title(fragment: str) -> list[int]:
    """Processes whose command line contains `fragment` (Ray names actor processes by class)."""
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as fh:
                    if fragment.encode() in fh.read():
                        out.append(int(entry))
            except OSError:
                continue
    return out


def check_exactly_once(out, expected_uris, reference_out=None, score_columns=("det_score", "serfiq_raw",
                                                                               "mask_fraction", "dbcnn"),
                       differ=()):
    """The committed output of the latest model version, row by row against the input: every input
    URI in exactly one row of the committed data files (read raw, not de-duplicated), no other
    row; with `reference_out`, every row's status and scores equal to that (undisturbed) run's."""
    import numpy as np
    import pyarrow.compute as pc

    from cafi import manifest

    runs = manifest.committed_runs(str(out))
    assert runs, "nothing committed"
    version = runs[-1]["model_version"]
    ids = manifest.committed_run_ids(str(out), version)
    flt = pc.field("run_id").isin(ids) & (pc.field("model_version") == version)
    table = manifest.dataset(str(out)).to_table(filter=flt)
    uris = table.column("uri").to_pylist()
    assert len(uris) == len(set(uris)), f"{len(uris) - len(set(uris))} URIs have more than one row"
    missing, unexpected = set(expected_uris) - set(uris), set(uris) - set(expected_uris)
    assert not missing and not unexpected, f"missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}"
    rows = {r["uri"]: r for r in table.to_pylist()}
    if reference_out is not None:
        ref = {r["uri"]: r for r in manifest.read(str(reference_out)).to_pylist()}
        for uri, row in rows.items():
            if uri in differ:  # inputs the disturbance itself is meant to change
                continue
            assert row["status"] == ref[uri]["status"], (uri, row["status"], ref[uri]["status"])
            for col in score_columns:
                a, b = row[col], ref[uri][col]
                assert (a is None) == (b is None), (uri, col, a, b)
                if a is not None:
                    assert np.isclose(a, b, rtol=1e-4, atol=1e-5), (uri, col, a, b)
    return rows


# ---------------------------------------------------------------- a model actor that holds its batch

GATE_ENV = "CAFI_TEST_GATE_DIR"
HOLD_S = 600.0  # the longest a gated call holds its batch (the scenario removes the node long before)


def hold_batches_on_gated_node() -> None:
    """A Ray `worker_process_setup_hook` (it runs in every worker process of the job that names it):
    wraps `FusedModels.__call__` with `_gate`. Without `CAFI_TEST_GATE_DIR` it changes nothing."""
    gate = os.environ.get(GATE_ENV)
    if not gate:
        return
    from cafi.stages.actor import FusedModels

    call = FusedModels.__call__
    if getattr(call, "gated", False):
        return

    def gated(self, batch: dict) -> dict:
        _poison_waits_for_the_kill(gate, batch)
        _gate(gate, batch)
        return call(self, batch)

    gated.gated = True
    FusedModels.__call__ = gated
    _kill_on_poison(gate)


POISON_MARK = b"CAFI-TEST-POISON"


def poison_png(seed: int = 0) -> bytes:
    """A valid PNG face whose bytes carry POISON_MARK (a tEXt chunk): scored as any other unless armed."""
    import io

    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    from cafi.samples import draw_face

    info = PngInfo()
    info.add_text("note", POISON_MARK.decode())
    buf = io.BytesIO()
    Image.fromarray(draw_face(160, seed)).save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()


def arm_poison(gate: str) -> None:
    """From now on a worker that decodes bytes carrying POISON_MARK dies on the spot (as a kill for
    memory or a crash in a native decoder would end it)."""
    _write_json(os.path.join(gate, "poison.json"), {})


def _poison_waits_for_the_kill(gate: str, batch: dict) -> None:
    """A batch with the poison input waits while the gate is armed: its deaths come after the gated
    kill, never in the process the scenario is about to kill."""
    if not any("poison" in str(u) for u in batch["uri"]):
        return
    deadline = time.time() + HOLD_S
    while os.path.exists(os.path.join(gate, "victim.json")) and time.time() < deadline:
        time.sleep(0.1)


def _kill_on_poison(gate: str) -> None:
    from cafi import imaging

    decode = imaging.decode

    def deadly(data, cfg):
        if POISON_MARK in bytes(data) and os.path.exists(os.path.join(gate, "poison.json")):
            os._exit(137)
        return decode(data, cfg)

    imaging.decode = deadly


def arm_gate(gate: str, run: str, node_id: str, holds: str = "") -> None:
    """From now on a model actor on node `node_id` holds every batch it is given that has a URI
    containing `holds` (see `_gate`); other batches it scores as usual."""
    _write_json(os.path.join(gate, "victim.json"), {"run": run, "node_id": node_id, "holds": holds})


def disarm_gate(gate: str) -> None:
    try:
        os.remove(os.path.join(gate, "victim.json"))
    except FileNotFoundError:
        pass


def held_batches(gate: str, run: str, kind: str = "held") -> list[dict]:
    """What the gated node's calls wrote: `held` when a call took its batch, `released` when it let a
    batch go because the node was still there after HOLD_S."""
    import glob
    import json

    out = []
    for path in sorted(glob.glob(os.path.join(gate, f"{run}.{kind}.*.json"))):
        with open(path) as fh:
            out.append(json.load(fh))
    return out


def wait_for_held(gate: str, run: str, alive, timeout: float) -> list[dict]:
    """The gated node's held batches, once there is one (or [] when `alive()` turns false or `timeout`
    passes first)."""
    deadline = time.time() + timeout
    while time.time() < deadline and alive():
        held = held_batches(gate, run)
        if held:
            return held
        time.sleep(0.2)
    return held_batches(gate, run)


def _gate(gate: str, batch: dict) -> None:
    """In a model actor's call, before the models. On the armed node, for a batch with a URI that
    contains `holds`: write a `held` record (node, actor, the batch's URIs) and wait, without
    returning, for the node to be removed (the process is killed with it); bounded by HOLD_S, after
    which a `released` record says the batch was let go. On any other node: wait (bounded) until
    the armed node holds a batch. The actor pool gives each actor at most a few batches at a time
    (`max_tasks_in_flight_per_actor`), so with the others waiting the armed node's actor is given
    such a batch whatever order the pool dispatches in, as long as there are more of them than the
    others can take."""
    import json
    import threading

    import ray

    try:
        with open(os.path.join(gate, "victim.json")) as fh:
            victim = json.load(fh)
    except FileNotFoundError:
        return  # not armed: an undisturbed run, or the node is gone
    ctx = ray.get_runtime_context()
    deadline = time.time() + HOLD_S
    if ctx.get_node_id() != victim["node_id"]:
        while not held_batches(gate, victim["run"]) and time.time() < deadline:
            time.sleep(0.1)
        return
    uris = [str(u) for u in batch["uri"]]
    if not any(victim["holds"] in u for u in uris):
        return
    record = {"node_id": ctx.get_node_id(), "actor_id": ctx.get_actor_id(), "pid": os.getpid(), "uris": uris}
    name = f"{victim['run']}.%s.{os.getpid()}-{threading.get_ident()}-{time.monotonic_ns()}.json"
    _write_json(os.path.join(gate, name % "held"), record)
    while time.time() < deadline:
        time.sleep(0.5)
    _write_json(os.path.join(gate, name % "released"), record)


def _write_json(path: str, obj) -> None:
    import json

    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as fh:
        json.dump(obj, fh)
    os.replace(tmp, path)  # readers never see a partial file


class ServerIgnoringRange:
    """An HTTP server on loopback serving a folder, answering every GET with the whole body."""

    def __init__(self, folder):
        import functools
        import http.server

        class Handler(http.server.SimpleHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def handle(self):
                try:
                    super().handle()
                except (BrokenPipeError, ConnectionResetError):  # the reader stopped at its limit
                    pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0),
                                                      functools.partial(Handler, directory=str(folder)))

    def __enter__(self) -> str:
        import threading

        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return f"http://127.0.0.1:{self.server.server_port}"

    def __exit__(self, *exc):
        self.server.shutdown()
