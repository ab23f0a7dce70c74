"""A Backchat bot in 20 lines: mention it ("@clock time?") and it answers with the time.

Add a bot named clock on the room's Manage page, with the webhook http://127.0.0.1:8002/, then
run this beside the server: .venv/bin/python lesson/clock_bot.py (README, "Bots and the API")."""
import json
import os
import time
from http.server import BaseHTTPRequestHandler, HTTPServer


class Webhook(BaseHTTPRequestHandler):
    def do_POST(self) -> None:  # Backchat calls this when a message mentions the bot
        called = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        asked = called["message"]["text"].lower()
        answer = {"text": time.strftime("It is %H:%M:%S.")} if "time" in asked else {}
        body = json.dumps(answer).encode()  # {"text": ...} is posted as the bot's reply
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


port = int(os.environ.get("BOT_PORT", "8002"))
print(f"clock bot: its webhook is http://127.0.0.1:{port}/", flush=True)
HTTPServer(("127.0.0.1", port), Webhook).serve_forever()
