// Web chat: loads the current session's history, sends messages with the session's CSRF
// token and renders the answer as it streams in (newline-delimited JSON over fetch).
// All text goes in through textContent, never innerHTML.
"use strict";

(() => {
  const csrf = document.querySelector('meta[name="csrf-token"]').content;
  const list = document.getElementById("messages");
  const form = document.getElementById("composer");
  const input = document.getElementById("input");
  const send = document.getElementById("send");
  const persona = document.getElementById("persona");

  function scrollDown() {
    list.scrollTop = list.scrollHeight;
  }

  function bubble(role, text) {
    const empty = list.querySelector(".empty-chat");
    if (empty) empty.remove();
    const div = document.createElement("div");
    div.className = "msg " + role;
    div.textContent = text;
    list.appendChild(div);
    scrollDown();
    return div;
  }

  async function loadHistory() {
    try {
      const response = await fetch("/api/history", { credentials: "same-origin" });
      if (response.status === 401) { window.location.reload(); return; }
      if (!response.ok) throw new Error("HTTP " + response.status);
      const history = await response.json();
      persona.textContent = history.persona;
      list.textContent = "";
      if (history.messages.length === 0) {
        const p = document.createElement("p");
        p.className = "empty-chat";
        p.textContent = "Say hello to " + history.persona + ".";
        list.appendChild(p);
      }
      for (const m of history.messages) bubble(m.role, m.text);
      if (history.before !== undefined) earlierButton(history.before);
    } catch (e) {
      bubble("error", "Could not load the conversation: " + e.message);
    }
  }

  // History comes in bounded pages, newest first; older ones on request.
  function earlierButton(before) {
    const button = document.createElement("button");
    button.type = "button";
    button.className = "load-earlier";
    button.textContent = "Load earlier messages";
    button.addEventListener("click", async () => {
      button.disabled = true;
      try {
        const response = await fetch("/api/history?before=" + encodeURIComponent(before),
          { credentials: "same-origin" });
        if (!response.ok) throw new Error("HTTP " + response.status);
        const page = await response.json();
        button.remove();
        const first = list.firstChild;
        for (const m of page.messages) {
          const div = document.createElement("div");
          div.className = "msg " + m.role;
          div.textContent = m.text;
          list.insertBefore(div, first);
        }
        if (page.before !== undefined) earlierButton(page.before);
      } catch (e) {
        button.disabled = false;
        button.textContent = "Could not load earlier messages: " + e.message;
      }
    });
    list.insertBefore(button, list.firstChild);
  }

  async function sendMessage(text) {
    bubble("user", text);
    const answer = bubble("assistant pending", "");
    send.disabled = true;
    let streamed = "";
    try {
      const response = await fetch("/api/chat", {
        method: "POST",
        credentials: "same-origin",
        headers: { "Content-Type": "application/json", "X-CSRF-Token": csrf },
        body: JSON.stringify({ message: text }),
      });
      if (!response.ok) {
        let message = "HTTP " + response.status;
        try { message = (await response.json()).error.message; } catch (_) { /* not JSON */ }
        throw new Error(message);
      }
      const reader = response.body.getReader();
      const decoder = new TextDecoder();
      let buffer = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer += decoder.decode(value, { stream: true });
        let newline;
        while ((newline = buffer.indexOf("\n")) >= 0) {
          const line = buffer.slice(0, newline).trim();
          buffer = buffer.slice(newline + 1);
          if (!line) continue;
          const event = JSON.parse(line);
          if (typeof event.delta === "string") {
            streamed += event.delta;
            answer.textContent = streamed;
          } else if (typeof event.done === "string") {
            answer.textContent = event.done;
            answer.classList.remove("pending");
            answer.dataset.done = "true";
          } else if (typeof event.error === "string") {
            throw new Error(event.error);
          }
          scrollDown();
        }
      }
      if (answer.dataset.done !== "true") throw new Error("the answer was cut off");
    } catch (e) {
      answer.classList.remove("pending");
      if (!answer.textContent) answer.remove();
      bubble("error", e.message);
    } finally {
      send.disabled = false;
      input.focus();
    }
  }

  form.addEventListener("submit", (event) => {
    event.preventDefault();
    const text = input.value.trim();
    if (!text || send.disabled) return;
    input.value = "";
    sendMessage(text);
  });

  input.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      form.requestSubmit();
    }
  });

  loadHistory();
})();
