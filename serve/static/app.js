// The web chat page: talks to POST /v1/chat and GET /v1/sessions/{id} of the same server.
// No build step and no dependencies. Text is always inserted as text (never as HTML).
// It never holds the API key: POST /v1/web/session gives it a session token, signed by the
// server and bound to one server-chosen session, sent as `Authorization: Bearer TOKEN`
// (docs/security.md). The token is renewed while valid; an expired one starts a new chat.
"use strict";

(function () {
  const STORAGE_KEY = "supportbot.web_session";
  const RENEW_BEFORE_S = 3600; // renew a token that has less than an hour left
  const els = {
    messages: document.getElementById("messages"),
    form: document.getElementById("composer"),
    input: document.getElementById("message"),
    send: document.getElementById("send"),
    quick: document.getElementById("quick-replies"),
    handoff: document.getElementById("handoff"),
    error: document.getElementById("error"),
    typing: document.getElementById("typing"),
    newChat: document.getElementById("new-chat"),
  };
  // {session_id, token, expires_at}: the conversation and the token that may use it.
  let session = readSession();
  let busy = false;

  function now() { return Date.now() / 1000; }

  function readSession() {
    try {
      const stored = JSON.parse(window.localStorage.getItem(STORAGE_KEY) || "null");
      if (stored && stored.token && stored.session_id && stored.expires_at > now()) return stored;
    } catch (_) { /* unreadable: start afresh */ }
    return null;
  }

  function saveSession(value) {
    session = value;
    try {
      if (value) window.localStorage.setItem(STORAGE_KEY, JSON.stringify(value));
      else window.localStorage.removeItem(STORAGE_KEY);
    } catch (_) { /* private mode: the session lasts as long as the page */ }
  }

  // A valid session token: the stored one, renewed when it is close to expiry, or a new one.
  async function ensureSession() {
    if (session && session.expires_at - now() > RENEW_BEFORE_S) return session;
    const headers = { "Accept": "application/json" };
    if (session && session.expires_at > now()) headers["Authorization"] = "Bearer " + session.token;
    const response = await fetch("/v1/web/session", { method: "POST", headers: headers });
    if (!response.ok) {
      const body = await response.json().catch(() => null);
      const error = new Error("session");
      error.status = response.status; error.body = body; error.headers = response.headers;
      throw error;
    }
    const body = await response.json();
    saveSession({ session_id: body.session_id, token: body.token, expires_at: body.expires_at });
    return session;
  }

  function safeUrl(url) {
    // Only web links and same-site paths become links (never javascript: or data:).
    return typeof url === "string" && (/^https?:\/\//i.test(url) || /^\/(?!\/)/.test(url));
  }

  function addMessage(role, text, sources) {
    const item = document.createElement("li");
    item.className = "message " + role;
    const who = document.createElement("span");
    who.className = "sr-only";
    who.textContent = role === "user" ? "You said: " : "Assistant: ";
    item.appendChild(who);
    item.appendChild(document.createTextNode(text));
    for (const source of sources || []) {
      if (!source || !safeUrl(source.url)) continue;
      const cite = document.createElement("a");
      cite.className = "source";
      cite.href = source.url;
      cite.target = "_blank";
      cite.rel = "noopener noreferrer";
      cite.textContent = source.title || source.url;
      item.appendChild(cite);
    }
    els.messages.appendChild(item);
    item.scrollIntoView({ block: "end" });
    return item;
  }

  function showQuickReplies(options) {
    els.quick.replaceChildren();
    for (const option of options || []) {
      const button = document.createElement("button");
      button.type = "button";
      button.textContent = option;
      button.addEventListener("click", () => { send(option); els.input.focus(); });
      els.quick.appendChild(button);
    }
    els.quick.hidden = els.quick.childElementCount === 0;
  }

  function showHandoff(on) {
    els.handoff.hidden = !on;
    document.body.classList.toggle("handed-off", Boolean(on));
  }

  function showError(message) {
    els.error.textContent = message || "";
    els.error.hidden = !message;
  }

  function setBusy(on) {
    busy = on;
    els.send.disabled = on;
    els.typing.hidden = !on;
    els.messages.setAttribute("aria-busy", on ? "true" : "false");
  }

  function describeError(status, body, headers) {
    const message = body && body.error && body.error.message;
    if (status === 429) {
      const wait = headers.get("Retry-After");
      return "You are sending messages too quickly." + (wait ? " Please wait " + wait + " s and try again." : "");
    }
    if (status === 401) return "Your chat session has expired. Please send your message again to start a new chat.";
    if (status === 503) return "The assistant is not available right now. Please try again in a moment.";
    return message || "Something went wrong (HTTP " + status + "). Please try again.";
  }

  async function send(text) {
    const message = text.trim();
    if (!message || busy) return;
    showError("");
    showQuickReplies([]);
    const bubble = addMessage("user", message);
    setBusy(true);
    function failed(status, body, headers) {
      bubble.classList.add("failed");
      bubble.setAttribute("aria-label", "Not sent: " + message);
      if (!els.input.value) els.input.value = message; // keep what the customer wrote
      showError(describeError(status, body, headers));
    }
    try {
      let current;
      try { current = await ensureSession(); } catch (error) {
        if (error.status) { failed(error.status, error.body, error.headers); return; }
        throw error;
      }
      const response = await fetch("/v1/chat", {
        method: "POST",
        headers: {
          "Content-Type": "application/json", "Accept": "application/json",
          "Authorization": "Bearer " + current.token,
        },
        body: JSON.stringify({ message: message, session_id: current.session_id }),
      });
      const body = await response.json().catch(() => null);
      if (!response.ok || !body) {
        if (response.status === 401) saveSession(null); // the token no longer works: the next send starts anew
        failed(response.status, body, response.headers);
        return;
      }
      if (!body.silent && body.reply) addMessage("bot", body.reply, body.sources);
      showQuickReplies(body.quick_replies);
      showHandoff(body.handed_off);
    } catch (_) {
      bubble.classList.add("failed");
      if (!els.input.value) els.input.value = message;
      showError("The message could not be sent: no connection to the server. Please try again.");
    } finally {
      setBusy(false);
    }
  }

  async function restore() {
    if (!session) return;
    try {
      const response = await fetch("/v1/sessions/" + encodeURIComponent(session.session_id), {
        headers: { "Accept": "application/json", "Authorization": "Bearer " + session.token },
      });
      if (response.status === 401) { saveSession(null); return; }
      if (response.status === 404) return; // no message yet: the token and its session stay
      if (!response.ok) return;
      const body = await response.json();
      let lastBot = null;
      for (const turn of body.turns) {
        addMessage(turn.role === "user" ? "user" : "bot", turn.text, turn.metadata && turn.metadata.sources);
        if (turn.role === "bot") lastBot = turn;
      }
      const last = body.turns[body.turns.length - 1];
      const meta = (lastBot && lastBot.metadata) || {};
      if (last && last.role === "bot") showQuickReplies(meta.quick_replies);
      showHandoff(Boolean(meta.handed_off));
    } catch (_) { /* offline: start with an empty page, the session id is kept */ }
  }

  els.form.addEventListener("submit", (event) => {
    event.preventDefault();
    const text = els.input.value;
    if (!text.trim() || busy) return;
    els.input.value = "";
    send(text);
    els.input.focus();
  });

  els.input.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      els.form.requestSubmit();
    }
  });

  els.newChat.addEventListener("click", () => {
    saveSession(null);
    els.messages.replaceChildren();
    showQuickReplies([]);
    showHandoff(false);
    showError("");
    els.input.focus();
  });

  restore();
})();
