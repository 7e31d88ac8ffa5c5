#!/usr/bin/env python3
"""Moltmates in-sandbox proxy forwarder.

Sandboxes have no network, only loopback. This script listens on 127.0.0.1:3128 inside the
sandbox's own network namespace and relays every connection, byte for byte, to the gateway's
egress proxy through the unix socket mounted at /run/moltmate/proxy/proxy.sock. It makes no
decisions: the gateway-side proxy filters every request.

Usage: python3 fwd.py [--listen HOST:PORT] [--socket PATH] [--ready FILE]
"""

import os
import socket
import sys
import threading

LISTEN = ("127.0.0.1", 3128)
SOCKET = "/run/moltmate/proxy/proxy.sock"
READY = "/tmp/.moltmate-proxy-ready"
BUFFER = 65536


def pump(src, dst):
    """Copy src to dst until EOF, then half-close dst so the peer sees the end."""
    try:
        while True:
            data = src.recv(BUFFER)
            if not data:
                break
            dst.sendall(data)
    except OSError:
        pass
    finally:
        try:
            dst.shutdown(socket.SHUT_WR)
        except OSError:
            pass


def handle(client, path):
    upstream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        upstream.connect(path)
    except OSError as exc:
        msg = "egress proxy unavailable: %s\n" % exc
        client.sendall(
            b"HTTP/1.1 502 Bad Gateway\r\nContent-Type: text/plain\r\nConnection: close\r\n"
            + b"Content-Length: %d\r\n\r\n" % len(msg)
            + msg.encode()
        )
        client.close()
        upstream.close()
        return
    back = threading.Thread(target=pump, args=(upstream, client), daemon=True)
    back.start()
    pump(client, upstream)
    back.join()
    client.close()
    upstream.close()


def main(argv):
    listen, path, ready = LISTEN, SOCKET, READY
    args = list(argv)
    while args:
        flag = args.pop(0)
        if not args:
            sys.exit("missing value for " + flag)
        value = args.pop(0)
        if flag == "--listen":
            host, _, port = value.rpartition(":")
            listen = (host, int(port))
        elif flag == "--socket":
            path = value
        elif flag == "--ready":
            ready = value
        else:
            sys.exit("unknown option " + flag)
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind(listen)
    server.listen(64)
    try:
        with open(ready, "w"):
            pass
    except OSError:
        pass
    while True:
        client, _ = server.accept()
        threading.Thread(target=handle, args=(client, path), daemon=True).start()


if __name__ == "__main__":
    main(sys.argv[1:])
