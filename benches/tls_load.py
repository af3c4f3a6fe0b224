#!/usr/bin/env python3
"""Steady TLS handshake load: new connections at a fixed rate, each a
full handshake (no session reuse), one HTTP request, then closed.

Usage: tls_load.py HOST PORT SERVER_NAME CA_FILE RATE SECONDS OUT.tsv

Verifies the server's certificate against CA_FILE and SERVER_NAME, as a
client would. Writes one line per second: second, handshakes that
succeeded, handshakes that failed (refused, reset, TLS or verification
error, timeout), and the first error text of that second. Exits 0; the
caller reads the file.
"""

import socket
import ssl
import sys
import threading
import time


def main():
    host, port, name, ca, rate, seconds, out = sys.argv[1:8]
    port, rate, seconds = int(port), float(rate), int(seconds)
    ctx = ssl.create_default_context(cafile=ca)
    # No session cache: every connection is a full handshake that the
    # server signs.
    ctx.options |= ssl.OP_NO_TICKET
    start = time.monotonic()
    ok = [0] * (seconds + 1)
    bad = [0] * (seconds + 1)
    first = [""] * (seconds + 1)
    lock = threading.Lock()

    def one(slot):
        try:
            with socket.create_connection((host, port), timeout=5) as raw:
                with ctx.wrap_socket(raw, server_hostname=name) as s:
                    s.sendall(b"GET / HTTP/1.1\r\nHost: " + name.encode() + b"\r\nConnection: close\r\n\r\n")
                    s.recv(64)
            with lock:
                ok[slot] += 1
        except Exception as e:  # every failure counts, whatever it is
            with lock:
                bad[slot] += 1
                if not first[slot]:
                    first[slot] = f"{type(e).__name__}: {e}"[:160]

    threads = []
    n = 0
    while True:
        due = start + n / rate
        now = time.monotonic()
        if due - start >= seconds:
            break
        if due > now:
            time.sleep(due - now)
        slot = int(due - start)
        t = threading.Thread(target=one, args=(slot,), daemon=True)
        t.start()
        threads.append(t)
        n += 1
        if len(threads) > 256:
            threads = [t for t in threads if t.is_alive()]
    for t in threads:
        t.join(10)
    with open(out, "w") as f:
        for s in range(seconds):
            f.write(f"{s}\t{ok[s]}\t{bad[s]}\t{first[s]}\n")


if __name__ == "__main__":
    main()
