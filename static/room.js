// room.js: the room page's only script of our own, for what htmx 4 cannot do without eval
// (its hx-on attributes compile JavaScript at run time, which the page's
// Content-Security-Policy refuses): the composer, the connection status, and focus.
// Everything else is htmx attributes and HTML the server renders. The README's "room.js"
// section says why each part is here.
"use strict";
(() => {
  // 1. The composer empties the moment a message leaves, so what you type next is never
  // overwritten when the server's answer lands on a slow link; and each message leaves
  // with a one-time key of its own. Until the server answers for a message it is sent
  // again on every reconnect (the key has it stored once); if refused, it comes back.
  const unconfirmed = new Map(); // one-time key -> {frame, text, socket it went out on}
  let lastKey = null;

  function freshKey() { // base64url of 16 random bytes (crypto.randomUUID needs https)
    const bytes = crypto.getRandomValues(new Uint8Array(16));
    return btoa(String.fromCharCode(...bytes)).replace(/\+/g, "-").replace(/\//g, "_").replace(/=+$/, "");
  }

  function giveBack(text, answer) { // into the box if it is empty, else quoted in the answer
    const input = document.getElementById("message-input");
    if (input && !input.value) {
      input.value = text;
    } else if (answer) {
      const unsent = document.createElement("q");
      unsent.className = "unsent";
      unsent.textContent = text;
      answer.append(" Not sent: ", unsent);
    }
  }

  // Enter sends (the composer) or saves (the editor); Shift+Enter makes a new line, as does
  // Enter while an input method is still composing a word. Tab is left to the browser.
  document.addEventListener("keydown", (event) => {
    const box = event.target;
    if (event.key !== "Enter" || event.shiftKey || event.isComposing || !box.matches("textarea[data-enter-sends]")) return;
    event.preventDefault();
    box.form?.requestSubmit();
  });

  // hx-ws has read the form and is about to send it (or queue it while offline).
  document.addEventListener("htmx:ws:before:message:outgoing", (event) => {
    const form = event.target;
    if (form.id !== "composer") return;
    const { values, headers } = event.detail.message;
    lastKey = values.key;
    unconfirmed.set(lastKey, { frame: JSON.stringify({ ...values, headers }), text: values.message, socket: null });
    form.elements.message.value = "";
    form.elements.question.checked = form.elements.anonymous.checked = false; // (one question at a time)
    form.elements.key.value = freshKey();
    document.getElementById("replying")?.replaceChildren(); // (the reply went with this message)
  });

  document.addEventListener("htmx:ws:after:message:outgoing", (event) => { // (not while queued)
    const sent = unconfirmed.get(event.detail.message.values?.key);
    if (sent) sent.socket = event.detail.connection.socket;
  });

  // Every frame the server sends: a sign of life, and maybe the answer to a message.
  let lastHeard = Date.now();
  document.addEventListener("htmx:ws:after:message:incoming", () => {
    lastHeard = Date.now();
    const answer = document.getElementById("chat-error");
    if (!answer || answer.dataset.key === undefined || answer.dataset.handled) return;
    answer.dataset.handled = "yes";
    const sent = unconfirmed.get(answer.dataset.key);
    unconfirmed.delete(answer.dataset.key);
    if (sent && answer.textContent.trim()) giveBack(sent.text, answer); // refused
  });

  document.addEventListener("htmx:ws:error", (event) => { // e.g. 100 messages queued offline
    if (event.target.id === "composer" && unconfirmed.has(lastKey)) {
      giveBack(unconfirmed.get(lastKey).text, document.getElementById("chat-error"));
      unconfirmed.delete(lastKey);
    }
  });

  // 2. The connection status, a polite live region that changes only when the state does:
  // "Live" when the socket opens, "Reconnecting…" within a second of it closing or of the
  // server's heartbeats stopping (a dead link no close ever crossed: the socket is closed
  // here, and htmx opens a new one).
  function say(state, text) {
    const status = document.getElementById("connection");
    if (!status || status.classList.contains("ended") || status.dataset.state === state) return;
    status.dataset.state = state;
    status.textContent = text;
  }

  let socket = null;
  document.addEventListener("htmx:ws:after:connection", (event) => {
    socket = event.detail.connection.socket;
    lastHeard = Date.now();
    say("live", "Live");
    for (const sent of unconfirmed.values()) { // sent on a socket that died before it answered
      if (sent.socket && sent.socket !== socket) {
        sent.socket = socket;
        socket.send(sent.frame); // (what htmx still holds in its queue, it sends itself)
      }
    }
  });

  document.addEventListener("htmx:ws:close", (event) => {
    const { code, connection, reason } = event.detail;
    if (reason === "closed" && connection.config.reconnectCodes.includes(code)) {
      say("reconnecting", "Reconnecting…");
    } else if (reason === "closed") { // htmx will not retry: the page is done
      say("closed", "Not connected: reload the page.");
      const texts = [...unconfirmed.values()].map((sent) => sent.text);
      unconfirmed.clear();
      if (texts.length) giveBack(texts.join(" "), document.getElementById("chat-error"));
    }
  });

  // 3. Focus. The server's answers replace elements (an edited message, the closed editor, a
  // poll or a question whose votes changed) and focus on a replaced element falls to the page
  // itself, where a keyboard or a screen reader is lost. So the control that had focus in a
  // message, a question or the pin (or the message whose editor is open) is remembered, and
  // when focus was lost it goes back there, or to the composer if that is gone (deleted).
  let focusedIn = null; // [message id, which of its buttons and links]
  document.addEventListener("focusin", (event) => {
    if (event.target.closest("#editor, #reactor")) return; // editing, reacting: the message is still the place to come back to
    const message = event.target.closest(".msg, .question, #pinned"); // (each has an id, and comes back re-rendered)
    focusedIn = message ? [message.id, [...message.querySelectorAll("button, a")].indexOf(event.target)] : null;
  });

  function refocus() {
    if (!focusedIn || (document.activeElement && document.activeElement !== document.body)) return;
    const message = document.getElementById(focusedIn[0]);
    let control = message?.querySelectorAll("button, a")[focusedIn[1]];
    if (control && !control.checkVisibility()) { // a reaction's "give" became "take back", or back
      control = [...control.parentElement.children].find((twin) => twin.checkVisibility());
    }
    (control || document.getElementById("message-input"))?.focus();
  }
  for (const name of ["htmx:after:swap", "htmx:ws:after:message:incoming"]) document.addEventListener(name, refocus);
  document.addEventListener("htmx:after:swap", () => { // Reply: on to the box, to write the answer
    const replying = document.getElementById("replying");
    if (replying?.childElementCount && replying.dataset.armed !== replying.querySelector("input").value) {
      replying.dataset.armed = replying.querySelector("input").value;
      document.getElementById("message-input")?.focus();
    }
  });
  // The editor or the reactions open empty, so Edit never shows an earlier form while its own
  // loads. (On "beforetoggle": a "toggle" closed then opened within a task comes as one event,
  // open to open, and a form left in the editor was saved by keyboard before its own arrived.)
  document.addEventListener("beforetoggle", (event) => {
    if ((event.target.id === "editor" || event.target.id === "reactor") && event.newState === "open") {
      event.target.replaceChildren();
    }
  }, true);
  document.addEventListener("toggle", (event) => { // ...and closed (Escape, Cancel, chosen)
    if ((event.target.id === "editor" || event.target.id === "reactor") && event.newState === "closed") {
      setTimeout(refocus);
    }
  }, true);

  // 4. New messages you cannot miss. Your own brings the log to the bottom; somebody else's,
  // while you read older ones, leaves your place and shows "New messages ↓" (a polite status)
  // until you are back at the bottom. (The log is column-reverse: its bottom is scrollTop 0.)
  let log, below, seen;
  const newest = () => Number(log.querySelector(".msg:last-of-type")?.id.slice(4)) || 0;
  function toBottom() {
    log.scrollTop = 0;
    below.hidden = true;
  }
  document.addEventListener("DOMContentLoaded", () => {
    log = document.querySelector(".log");
    below = document.getElementById("new-below");
    if (!log || !below) return;
    seen = newest();
    log.addEventListener("scroll", () => { if (log.scrollTop > -40) below.hidden = true; }, { passive: true });
    below.addEventListener("click", toBottom);
  });
  document.addEventListener("htmx:ws:after:message:incoming", () => {
    if (!below || newest() <= seen) return;
    seen = newest();
    if (log.closest(".room").dataset.me.split(" ").includes(log.querySelector(".msg:last-of-type").dataset.author)) toBottom();
    else if (log.scrollTop < -40) below.hidden = false;
  });

  setInterval(() => {
    const status = document.getElementById("connection");
    const staleAfter = 1000 * Number(status?.dataset.staleAfter || 25);
    if (status?.dataset.state === "live" && Date.now() - lastHeard > staleAfter) {
      say("reconnecting", "Reconnecting…");
      socket?.close();
    }
  }, 1000);
})();
