"""A fake OpenAI-compatible upstream (vLLM-like) for tests/e2e/test_upstream.py.

Run as its own process so a test can kill it for real (SIGKILL closes every
keep-alive connection moat holds to it, as a crashed server would):

    python fake_upstream.py PORT NAME [GAP_SECONDS]

Serves `GET /v1/models` (health) and `POST /v1/chat/completions`, plain or
streamed. The answer is "hello from NAME" in three chunks, GAP_SECONDS apart,
with usage prompt_tokens=11, completion_tokens=3. Each chat request is
logged on stdout as one JSON line (the body moat sent, and the headers that
matter) so the test can check what reached the upstream.
"""

import json
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


PORT = int(sys.argv[1])
NAME = sys.argv[2]
GAP = float(sys.argv[3]) if len(sys.argv) > 3 else 0.0
WORDS = ["hello", " from", f" {NAME}"]
USAGE = {"prompt_tokens": 11, "completion_tokens": 3, "total_tokens": 14}


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def send_json(self, status, obj):
        body = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        if self.path == "/v1/models":
            self.send_json(200, {"object": "list", "data": [{"id": "up-model", "object": "model"}]})
        else:
            self.send_json(404, {"error": {"message": "no such route"}})

    def chunk(self, delta, finish=None, usage=None, choices=True):
        obj = {"id": f"up-{NAME}", "object": "chat.completion.chunk", "created": 1, "model": "up-model",
               "choices": [{"index": 0, "delta": delta, "finish_reason": finish}] if choices else []}
        if usage is not None:
            obj["usage"] = usage
        data = f"data: {json.dumps(obj)}\n\n".encode()
        self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
        self.wfile.flush()

    def do_POST(self):
        length = int(self.headers.get("content-length", "0"))
        req = json.loads(self.rfile.read(length))
        print(json.dumps({"body": req, "authorization": self.headers.get("authorization")}), flush=True)
        if self.path != "/v1/chat/completions":
            self.send_json(404, {"error": {"message": "no such route"}})
            return
        if not req.get("stream"):
            time.sleep(GAP * 2)
            self.send_json(200, {
                "id": f"up-{NAME}", "object": "chat.completion", "created": 1, "model": "up-model",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(WORDS)},
                             "finish_reason": "stop"}],
                "usage": USAGE,
            })
            return
        self.send_response(200)
        self.send_header("content-type", "text/event-stream")
        self.send_header("transfer-encoding", "chunked")
        self.end_headers()
        self.chunk({"role": "assistant", "content": ""})
        for i, w in enumerate(WORDS):
            if i:
                time.sleep(GAP)
            self.chunk({"content": w})
        self.chunk({}, finish="stop")
        self.chunk({}, usage=USAGE, choices=False)
        done = b"data: [DONE]\n\n"
        self.wfile.write(f"{len(done):x}\r\n".encode() + done + b"\r\n0\r\n\r\n")
        self.wfile.flush()


if __name__ == "__main__":
    server = ThreadingHTTPServer(("127.0.0.1", PORT), Handler)
    server.daemon_threads = True
    print("ready", flush=True)
    server.serve_forever()
