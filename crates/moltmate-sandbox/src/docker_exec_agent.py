import base64, json, os, selectors, signal, subprocess, sys, time

# The Docker backend's in-container command runner. It is started once per container with
# `docker exec -i` (as the sandbox user, passed as `python3 -I -c`, so nothing in the sandbox
# can replace it or shadow its modules) and then runs one command per request line on stdin,
# answering one JSON line on stdout. It replaces an Engine API exec per command (create + start
# + inspect, ~65 ms) with one line each way over the exec's already attached stream.
#
# Request:  {"id": str, "argv": [...], "timeout_ms": N, "cap": N}
# Reply:    {"id": str, "exit": int|null, "stdout": b64, "stderr": b64, "truncated": bool,
#            "timed_out": bool, "clean": bool}
#       or  {"id": str|null, "error": str, "clean": bool}   (bad request, failed spawn)
#
# Semantics are those of the per-exec path: the command runs unchanged in /workspace with the
# container's environment; output beyond `cap` bytes (stdout + stderr) is read and dropped.
# The command is over when its main process exits (background jobs holding its output open do
# not keep it running) or at the timeout; then every other process of the sandbox user is
# killed (kill(-1) spares only the caller and init) until none is left, so nothing outlives
# its call, and the rest of the output is read. "clean" says whether the kill succeeded.
# Commands get oom_score_adj 1000 so the memory limit kills them, not the runner.

ME = os.getpid()
UID = os.getuid()
# Group members share /family (group-owned, setgid): what a command makes must stay usable by
# the group. Homes are 0700 and the primary group is the user's own, so nothing else opens up.
os.umask(0o007)
WRAP = '{ echo 1000 >/proc/self/oom_score_adj; } 2>/dev/null; exec "$@"'


def harden():
    # Not dumpable: a command (same uid) cannot open /proc/<runner>/fd/* to forge replies or
    # inject requests, read its memory, ptrace it or change its oom_score_adj. Children become
    # dumpable again when they exec.
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(4, 0, 0, 0, 0)  # PR_SET_DUMPABLE = 4
    except Exception:
        pass


def others_left():
    # By the real uid in /proc/<pid>/status, not the owner of /proc/<pid>: a process that made
    # itself non-dumpable shows up as root-owned there but is still ours to kill.
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == ME:
            continue
        try:
            with open("/proc/" + name + "/status", "rb") as f:
                for line in f:
                    if line.startswith(b"Uid:"):
                        if int(line.split()[1]) == UID:
                            return True
                        break
        except (OSError, ValueError, IndexError):
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


# SIGCHLD wakes the select loop through this pipe when the command's main process exits.
CHILD_R, CHILD_W = os.pipe()
os.set_blocking(CHILD_R, False)
os.set_blocking(CHILD_W, False)


def run(req):
    deadline = time.monotonic() + req["timeout_ms"] / 1000.0
    cap = req["cap"]
    out = {1: bytearray(), 2: bytearray()}
    truncated = False
    timed_out = False
    proc = subprocess.Popen(
        ["/bin/sh", "-c", WRAP, "sh"] + [str(a) for a in req["argv"]],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd="/workspace",
        start_new_session=True,
    )
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ, 1)
    sel.register(proc.stderr, selectors.EVENT_READ, 2)
    sel.register(CHILD_R, selectors.EVENT_READ, 0)
    open_pipes = 2
    code = None
    clean = True
    reaped = False

    def take(fd, data):
        nonlocal truncated, open_pipes
        chunk = os.read(fd, 65536)
        if not chunk:
            sel.unregister(fd)
            open_pipes -= 1
            return
        room = cap - len(out[1]) - len(out[2])
        if len(chunk) > room:
            truncated = True
            chunk = chunk[: max(room, 0)]
        out[data] += chunk

    while open_pipes:
        if code is None and not reaped:
            code = proc.poll()
            if code is not None:
                # The command is over: whatever it left behind (and holds its output open)
                # dies now; the output already written is still read below.
                clean = reap()
                reaped = True
        left = deadline - time.monotonic()
        if left <= 0:
            if reaped:
                break  # writers are dead; an output that never ends cannot happen, but bound it
            timed_out = True
            break
        for key, _ in sel.select(left):
            if key.data == 0:
                try:
                    while os.read(CHILD_R, 512):
                        pass
                except BlockingIOError:
                    pass
            else:
                take(key.fd, key.data)
    if not reaped:
        if code is None and not timed_out:
            # Output closed first; the exit follows (or the timeout does).
            try:
                code = proc.wait(max(deadline - time.monotonic(), 0.001))
            except subprocess.TimeoutExpired:
                timed_out = True
        clean = reap()
    if timed_out:
        code = None
    elif code is not None and code < 0:
        code = 128 - code
    sel.close()
    proc.stdout.close()
    proc.stderr.close()
    return {
        "exit": code,
        "stdout": base64.b64encode(bytes(out[1])).decode(),
        "stderr": base64.b64encode(bytes(out[2])).decode(),
        "truncated": truncated,
        "timed_out": timed_out,
        "clean": clean,
    }


def main():
    harden()
    signal.set_wakeup_fd(CHILD_W)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    reply = sys.stdout.buffer
    clean = reap()
    reply.write(json.dumps({"ready": True, "clean": clean}).encode() + b"\n")
    reply.flush()
    for line in sys.stdin.buffer:
        rid = None
        try:
            req = json.loads(line)
            rid = req.get("id")
            answer = run(req)
        except Exception as e:  # a bad request or a failed spawn: say so, keep serving
            answer = {"error": type(e).__name__ + ": " + str(e), "clean": reap()}
        answer["id"] = rid
        reply.write(json.dumps(answer).encode() + b"\n")
        reply.flush()


main()
