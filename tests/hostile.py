#!/usr/bin/env python3
"""Issue 19's hostile checks against a real server, printing what it measured.

Usage: cargo build --release && python3 tests/hostile.py target/release/rapport DATABASE_URL PORT

It migrates DATABASE_URL (a database it may create), starts `rapport serve` on 127.0.0.1:PORT
several times, and reports: 40 concurrent POST /v1/messages at cold start; each template
bomb through preview (status, time, server RSS); /healthz latency while templates burn CPU;
the nested-map CEL audience on save; 200 half-sent or idle connections after 12 s; /healthz
under ulimit -n 256 with 300 idle connections. Loopback only; bounded in time. Not run by
CI: the same properties are asserted by tests/api/hardening.rs."""

import json, os, socket, subprocess, sys, threading, time, http.client, resource

BIN = sys.argv[1]
DB = sys.argv[2]
PORT = int(sys.argv[3])
ADMIN = "m-admin"
env = dict(os.environ, DATABASE_URL=DB, RAPPORT_ADMIN_TOKEN=ADMIN,
           RAPPORT_SECRET_KEY="KioqKioqKioqKioqKioqKioqKioqKioqKioqKioqKio=",
           RAPPORT_LOG_LEVEL="error", RAPPORT_LISTEN=f"127.0.0.1:{PORT}",
           RAPPORT_OUTBOX_LOG="/tmp/m-outbox.jsonl", RAPPORT_EMBEDDED_POSTGRES="never")
subprocess.run([BIN, "migrate"], env=env, check=True, capture_output=True)
subprocess.run([BIN, "tenant", "create", "--name", "M", "--slug", "m", "--default-country", "HR", "--default-locale", "hr"], env=env, capture_output=True)
out = subprocess.run([BIN, "api-key", "create", "--tenant", "m", "--name", "m"], env=env, check=True, capture_output=True, text=True).stdout
KEY = json.loads(out)["key"]

def call(method, path, body=None, token=KEY, timeout=60):
    c = http.client.HTTPConnection("127.0.0.1", PORT, timeout=timeout)
    h = {"Authorization": f"Bearer {token}"}
    if body is not None:
        h["Content-Type"] = "application/json"; body = json.dumps(body)
    t = time.time(); c.request(method, path, body=body, headers=h); r = c.getresponse(); data = r.read(); c.close()
    return r.status, time.time() - t, data

def rss(pid):
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS"): return int(line.split()[1]) // 1024
def start(extra=None, preexec=None):
    e = dict(env, **(extra or {}))
    p = subprocess.Popen([BIN, "serve"], env=e, stderr=subprocess.DEVNULL, preexec_fn=preexec)
    for _ in range(300):
        try:
            if call("GET", "/healthz", token="")[0] == 200: return p
        except Exception: time.sleep(0.05)
    raise SystemExit("no server")

# (d) cold start: 40 concurrent POST /v1/messages right after start
p = start()
call("PUT", "/v1/templates/hi", {"sms": {"hr": {"text": "Bok {{ contact.phone }}"}}})
call("PUT", "/v1/contacts/ana", {"phone": "+385911234567"})
p.terminate(); p.wait()
p = start()
res = []
def one():
    try: res.append(call("POST", "/v1/messages", {"contact": {"external_id": "ana"}, "template": "hi", "channel": "sms"})[:2])
    except Exception as e: res.append((0, 0))
ts = [threading.Thread(target=one) for _ in range(40)]
t0 = time.time(); [t.start() for t in ts]; [t.join() for t in ts]
print(f"cold start: 40 concurrent POST /v1/messages: {sum(1 for s,_ in res if s==202)} x 202, {sum(1 for s,_ in res if s==503)} x 503, all answered in {time.time()-t0:.2f} s")

# (a) template bombs
bombs = ["{{ {'a': 1}|tojson(indent=100000000000) }}", "{{ 'a\nb'|indent(100000000000) }}",
         "{{ range(10000)|join('x'*10000000) }}",
         "{% set a='x'*100000000 %}{% for i in range(60) %}{% set b=a~a %}{% endfor %}"]
base = rss(p.pid)
for i, b in enumerate(bombs):
    call("PUT", f"/v1/templates/b{i}", {"sms": {"hr": {"text": b}}})
    s, dt, data = call("POST", f"/v1/templates/b{i}/preview", {"channel": "sms"})
    msg = json.loads(data).get("errors", [{}])[0].get("message", "")
    print(f"template bomb {i}: {s} in {dt:.2f} s ({msg}); server alive: {call('GET','/healthz',token='')[0]==200}, server RSS {rss(p.pid)} MB (was {base})")
# health while a CPU bomb renders
lat = []
def health():
    for _ in range(20):
        lat.append(call("GET", "/healthz", token="")[1]); time.sleep(0.05)
th = threading.Thread(target=health); th.start()
call("POST", "/v1/templates/b3/preview", {"channel": "sms"}); call("POST", "/v1/templates/b3/preview", {"channel": "sms"})
th.join()
print(f"/healthz during two CPU bombs: max {max(lat)*1000:.0f} ms")
# (e) CEL bomb
L = "[" + ",".join(["1"]*100) + "]"
s, dt, data = call("POST", "/v1/campaigns", {"name": "x", "trigger": {"event": "a.b"}, "audience": f"size({L}.map(a,{L}.map(b,{L}.map(c,{L}.map(d,1))))) > 0", "steps": [{"type": "exit"}]})
print(f"CEL bomb on save: {s} in {dt*1000:.0f} ms; server RSS {rss(p.pid)} MB")
# (c) slow clients
socks = []
for n in range(200):
    s = socket.create_connection(("127.0.0.1", PORT))
    if n % 2 == 0: s.sendall(b"GET /healthz HTTP/1.1\r\nhost: x\r\n")
    socks.append(s)
time.sleep(12)
open_ = 0
for s in socks:
    s.setblocking(False)
    try:
        d = s.recv(1)
        if d == b"": pass
        else: open_ += 1
    except BlockingIOError: open_ += 1
    except Exception: pass
print(f"slow clients: {open_} of 200 half-sent or idle connections still open after 12 s")
[s.close() for s in socks]
p.terminate(); p.wait()
# under ulimit -n 256, 300 idle connections
def lim(): resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))
p = start(preexec=lim)
socks = [socket.create_connection(("127.0.0.1", PORT)) for _ in range(300)]
ok = 0
for _ in range(8):
    try:
        s, dt, _ = call("GET", "/healthz", token="", timeout=15); ok += (s == 200)
    except Exception: pass
print(f"ulimit -n 256, 300 idle connections: /healthz answered {ok} of 8 times")
[s.close() for s in socks]
p.terminate(); p.wait()
