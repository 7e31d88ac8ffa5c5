// Web chat: loads the current session's history, sends messages with the session's CSRF
// token and renders the answer as it streams in (newline-delimited JSON over fetch).
// All text goes in through textContent. The one exception is an assistant message's `html`:
// Markdown rendered by the server (crates/moltmate-web/src/markdown.rs), which escapes all of
// the model's text and raw HTML and keeps only http(s)/mailto links; the page's CSP forbids
// inline script besides.
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

  // Server-rendered, sanitised Markdown (see the note at the top).
  function setRendered(div, html) {
    const template = document.createElement("template");
    template.innerHTML = html;
    div.replaceChildren(template.content);
    div.classList.add("markdown");
  }

  function bubble(role, text, html) {
    const empty = list.querySelector(".empty-chat");
    if (empty) empty.remove();
    const div = document.createElement("div");
    div.className = "msg " + role;
    if (typeof html === "string") setRendered(div, html);
    else div.textContent = text;
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
      for (const m of history.messages) bubble(m.role, m.text, m.html);
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
            if (typeof event.html === "string") setRendered(answer, event.html);
            else answer.textContent = event.done;
            answer.classList.remove("pending");
            answer.dataset.done = "true";
          } else if (event.file && typeof event.file.url === "string"
                     && event.file.url.startsWith("/files/")) {
            // A file the assistant sent (send_file): a download link of our own origin.
            const div = document.createElement("div");
            div.className = "msg assistant file";
            const link = document.createElement("a");
            link.href = event.file.url;
            link.setAttribute("download", String(event.file.name || "download"));
            link.textContent = "Download " + String(event.file.name || "file")
              + " (" + Number(event.file.size || 0) + " bytes)";
            div.appendChild(link);
            list.appendChild(div);
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
