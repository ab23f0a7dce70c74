"""The idea of Backchat in one screen, runnable: `python lesson/minimal_chat.py`, then open
http://127.0.0.1:8001 in two windows. Each function names its hardened counterpart in chat.py."""
import json
import os
from pathlib import Path

import uvicorn
from starlette.applications import Starlette
from starlette.routing import Mount, Route, WebSocketRoute
from starlette.staticfiles import StaticFiles
from starlette.templating import Jinja2Templates
from starlette.websockets import WebSocket, WebSocketDisconnect

HERE = Path(__file__).resolve().parent
templates = Jinja2Templates(directory=HERE / "templates")  # autoescape: user text stays text
fragments = templates.env.get_template("lesson.html").module  # its macros, as Python functions
messages: list[dict] = []  # chat.py: SQLite (Store); here, gone when the process stops
sockets: set[WebSocket] = set()  # chat.py: RoomHub.connections, a set per room


async def room_page(request):
    """The page and its history. chat.py's room_page adds a login, rooms with codes, and the
    newest page of history from SQLite with the revision to catch up from."""
    return templates.TemplateResponse(request, "lesson.html", {"messages": messages})


async def chat_socket(websocket: WebSocket) -> None:
    """One socket per open page. chat.py's chat_socket adds the handshake checks in admit()
    (session, Origin, room), presence, and the catch-up of what a page missed."""
    await websocket.accept()
    sockets.add(websocket)
    try:
        while True:  # chat.py: handle_frame and parse_frame, which refuse what is not the form
            fields = json.loads(await websocket.receive_text())  # {"message": ..., "headers": ...}
            await post_message(websocket, fields.get("message", ""))
    except WebSocketDisconnect:
        sockets.discard(websocket)


async def post_message(sender: WebSocket, text: str) -> None:
    """Store, render once, push to everyone. chat.py's post_message adds the checks (length,
    rate, a one-time key) and a commit to SQLite before anybody is shown the message."""
    if not text.strip():
        return
    message = {"id": len(messages) + 1, "username": "someone", "text": text.strip()}
    messages.append(message)
    frame = str(fragments.messages_frame([message]))  # one string for every socket
    for socket in list(sockets):  # chat.py: broadcast(), and Connection.push() never waits
        await socket.send_text(frame)
    await sender.send_text(str(fragments.message_input(oob=True)))  # the box emptied (chat.py: room.js)


app = Starlette(routes=[
    Route("/", room_page),
    WebSocketRoute("/chat/", chat_socket),
    Mount("/static", StaticFiles(directory=HERE.parent / "static")),  # the same htmx 4 files
])

if __name__ == "__main__":
    uvicorn.run(app, host="127.0.0.1", port=int(os.environ.get("LESSON_PORT", "8001")))
