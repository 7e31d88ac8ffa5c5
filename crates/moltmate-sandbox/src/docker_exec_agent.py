import base64, json, os, selectors, subprocess, sys, time

# The Docker backend's in-container command runner. It is started once per container with
# `docker exec -i` (as the sandbox user, passed as `python3 -c`, so nothing in the sandbox can
# replace it) and then runs one command per request line on stdin, answering one JSON line on
# stdout. It replaces an Engine API exec per command (create + start + inspect, ~65 ms) with one
# line each way over the exec's already attached stream.
#
# Request:  {"argv": [...], "timeout_ms": N, "cap": N}
# Reply:    {"exit": int|null, "stdout": b64, "stderr": b64, "truncated": bool,
#            "timed_out": bool, "clean": bool}
#
# Semantics are those of the per-exec path: the command runs unchanged in /workspace with the
# container's environment; output beyond `cap` bytes (stdout + stderr) is read and dropped;
# on return or timeout every other process of the sandbox user is killed (kill(-1) spares only
# the caller and init) until none is left, so nothing outlives its call; "clean" says whether
# that succeeded. Commands get oom_score_adj 1000 so the memory limit kills them, not the agent.

ME = os.getpid()
UID = os.getuid()
WRAP = 'echo 1000 >/proc/self/oom_score_adj 2>/dev/null; exec "$@"'


def others_left():
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == ME:
            continue
        try:
            if os.stat("/proc/" + name).st_uid == UID:
                return True
        except OSError:
            pass
    return False


def reap():
    for _ in range(300):
        try:
            os.kill(-1, 9)
        except OSError:
            pass
        try:
            while os.waitpid(-1, os.WNOHANG)[0] > 0:
                pass
        except ChildProcessError:
            pass
        if not others_left():
            return True
        time.sleep(0.01)
    return False


def run(req):
    deadline = time.monotonic() + req["timeout_ms"] / 1000.0
    cap = req["cap"]
    out = {1: bytearray(), 2: bytearray()}
    truncated = False
    timed_out = False
    proc = subprocess.Popen(
        ["/bin/sh", "-c", WRAP, "sh"] + req["argv"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd="/workspace",
        start_new_session=True,
    )
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ, 1)
    sel.register(proc.stderr, selectors.EVENT_READ, 2)
    open_pipes = 2
    while open_pipes:
        left = deadline - time.monotonic()
        if left <= 0:
            timed_out = True
            break
        for key, _ in sel.select(left):
            chunk = os.read(key.fd, 65536)
            if not chunk:
                sel.unregister(key.fileobj)
                open_pipes -= 1
                continue
            room = cap - len(out[1]) - len(out[2])
            if len(chunk) > room:
                truncated = True
                chunk = chunk[: max(room, 0)]
            out[key.data] += chunk
    code = None
    if not timed_out:
        try:
            code = proc.wait(max(deadline - time.monotonic(), 0.001))
        except subprocess.TimeoutExpired:
            timed_out = True
    clean = reap()
    if code is None and not timed_out:
        code = proc.poll()
    if code is not None and code < 0:
        code = 128 - code
    if timed_out:
        code = None
    proc.stdout.close()
    proc.stderr.close()
    sel.close()
    return {
        "exit": code,
        "stdout": base64.b64encode(bytes(out[1])).decode(),
        "stderr": base64.b64encode(bytes(out[2])).decode(),
        "truncated": truncated,
        "timed_out": timed_out,
        "clean": clean,
    }


def main():
    reply = sys.stdout.buffer
    clean = reap()
    reply.write(json.dumps({"ready": True, "clean": clean}).encode() + b"\n")
    reply.flush()
    for line in sys.stdin.buffer:
        try:
            answer = run(json.loads(line))
        except Exception as e:  # a bad request or a failed spawn: say so, keep serving
            answer = {"error": type(e).__name__ + ": " + str(e), "clean": reap()}
        reply.write(json.dumps(answer).encode() + b"\n")
        reply.flush()


main()
