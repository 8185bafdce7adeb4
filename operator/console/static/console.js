// The console's own script: theme toggle, live updates over server-sent events, the chat stream.
(function () {
  function toggleTheme() {
    var root = document.documentElement;
    var dark = root.dataset.theme ? root.dataset.theme === "dark" : matchMedia("(prefers-color-scheme: dark)").matches;
    root.dataset.theme = dark ? "light" : "dark";
    localStorage.setItem("kubetune-theme", root.dataset.theme);
  }

  function liveRun(section) {
    var source = new EventSource(section.dataset.sse);
    source.addEventListener("status", function (e) { document.getElementById("run-status").innerHTML = e.data; });
    source.addEventListener("charts", function (e) { document.getElementById("charts").innerHTML = e.data; });
    source.addEventListener("log", function (e) {
      var log = document.getElementById("run-log");
      log.innerHTML = e.data;
      log.scrollTop = log.scrollHeight;
    });
    source.addEventListener("done", function () {
      source.close();
      section.dataset.done = "true";
    });
  }

  async function streamInto(target, data) {
    target.textContent = "";
    target.dataset.state = "streaming";
    var response = await fetch("/playground/chat", { method: "POST", body: new URLSearchParams(data) });
    var reader = response.body.getReader();
    var decoder = new TextDecoder();
    var chunks = 0;
    for (;;) {
      var part = await reader.read();
      if (part.done) break;
      target.textContent += decoder.decode(part.value, { stream: true });
      target.dataset.chunks = String(++chunks);
    }
    target.dataset.state = response.ok ? "done" : "error";
  }

  function chat(form, event) {
    event.preventDefault();
    var a = new FormData(form);
    var runs = [streamInto(document.getElementById("answer"), a)];
    if (a.get("model2")) {
      var b = new FormData(form);
      b.set("model", a.get("model2"));
      runs.push(streamInto(document.getElementById("answer2"), b));
    }
    return Promise.all(runs);
  }

  // An input whose error paragraph is not empty is marked invalid (screen readers say so).
  function markInvalid() {
    document.querySelectorAll(".field-error").forEach(function (p) {
      var input = document.getElementById("f-" + p.id.slice(4));
      if (input) input.setAttribute("aria-invalid", p.textContent.trim() ? "true" : "false");
    });
  }

  document.addEventListener("DOMContentLoaded", function () {
    document.getElementById("theme-toggle").addEventListener("click", toggleTheme);
    var live = document.querySelector("[data-sse]");
    if (live) liveRun(live);
    var form = document.getElementById("chat-form");
    if (form) form.addEventListener("submit", function (e) { chat(form, e); });
    document.body.addEventListener("htmx:afterSettle", markInvalid);
    document.body.addEventListener("htmx:oobAfterSwap", markInvalid);
  });
})();
