// Admin dashboard: ask before denying a pairing request (denial cannot be undone; the
// sender has to write again for a new code).
"use strict";
document.addEventListener("DOMContentLoaded", () => {
  for (const button of document.querySelectorAll("button.deny")) {
    button.addEventListener("click", (event) => {
      if (!window.confirm("Deny pairing request " + button.dataset.code + "?")) {
        event.preventDefault();
      }
    });
  }
});
