// The operator console's one script (served from this origin; the Content-Security-Policy allows
// nothing inline). It signs in and out, uploads, retries and keeps job progress current. Every
// request that changes something carries X-Medbatch-Console, which the API demands of a session
// authenticated by its cookie: another site's page cannot send it. Text is only ever set with
// textContent, never parsed as HTML.
(function () {
  "use strict";

  const base = document.body.dataset.base || "";
  const CONSOLE = { "X-Medbatch-Console": "1" };
  const TERMINAL = new Set(["done", "failed", "rejected", "not_applicable"]);
  const POLL_MS = 1000;

  function say(el, text, kind) {
    if (!el) return;
    el.textContent = text;
    el.classList.remove("error", "ok");
    if (kind) el.classList.add(kind);
  }

  function detail(status, text) {
    // The API answers refusals as problem details (RFC 9457): show their detail.
    try {
      const body = JSON.parse(text);
      if (body && body.detail) return body.detail;
    } catch (e) { /* not JSON */ }
    return "the server answered " + status;
  }

  // --- sign in and out ----------------------------------------------------------------------
  const signIn = document.getElementById("sign-in");
  if (signIn) {
    signIn.addEventListener("submit", async function (event) {
      event.preventDefault();
      const message = signIn.querySelector("[data-message]");
      const token = signIn.elements.token.value.trim();
      say(message, "checking the token …");
      const response = await fetch(base + "/api/v1/session", {
        method: "POST",
        headers: { "Content-Type": "application/json" },
        body: JSON.stringify({ token: token }),
        credentials: "same-origin",
      });
      if (response.ok) {
        signIn.elements.token.value = "";
        window.location.assign(base + (signIn.dataset.next || "/"));
      } else {
        say(message, detail(response.status, await response.text()), "error");
      }
    });
  }

  document.querySelectorAll("[data-sign-out]").forEach(function (button) {
    button.addEventListener("click", async function () {
      await fetch(base + "/api/v1/session", {
        method: "DELETE", headers: CONSOLE, credentials: "same-origin",
      });
      window.location.assign(base + "/sign-in");
    });
  });

  // --- uploads: a library or an extract ------------------------------------------------------
  document.querySelectorAll("form[data-upload]").forEach(function (form) {
    form.addEventListener("submit", function (event) {
      event.preventDefault();
      const message = form.querySelector("[data-message]");
      const bar = form.querySelector("progress");
      const button = form.querySelector("button[type=submit]");
      const data = new FormData(form);
      for (const [key, value] of Array.from(data.entries())) {
        if (value === "") data.delete(key); // empty options: the server's defaults
      }
      const xhr = new XMLHttpRequest(); // (fetch reports no upload progress)
      xhr.open("POST", form.dataset.upload);
      xhr.setRequestHeader("X-Medbatch-Console", "1");
      xhr.upload.addEventListener("progress", function (e) {
        if (e.lengthComputable) { bar.max = e.total; bar.value = e.loaded; }
      });
      xhr.addEventListener("load", function () {
        button.disabled = false;
        bar.hidden = true;
        if (xhr.status === 200 || xhr.status === 201) {
          const job = JSON.parse(xhr.responseText);
          say(message, (job.existing ? "already submitted as job " : "submitted as job ") + job.id, "ok");
          window.location.assign(base + "/jobs/" + encodeURIComponent(job.id));
        } else {
          let text = detail(xhr.status, xhr.responseText);
          try {
            const body = JSON.parse(xhr.responseText);
            if (body.job_id) text += " (recorded as job " + body.job_id + ")";
          } catch (e) { /* not JSON */ }
          say(message, text, "error");
        }
      });
      xhr.addEventListener("error", function () {
        button.disabled = false;
        bar.hidden = true;
        say(message, "the upload broke off; nothing was submitted, try again", "error");
      });
      button.disabled = true;
      bar.hidden = false;
      bar.removeAttribute("value");
      say(message, "uploading …");
      xhr.send(data);
    });
  });

  // --- retry (admin) -------------------------------------------------------------------------
  document.querySelectorAll("button[data-retry]").forEach(function (button) {
    button.addEventListener("click", async function () {
      const message = document.querySelector("main [data-message]");
      button.disabled = true;
      const id = button.dataset.retry;
      const response = await fetch(base + "/api/v1/jobs/" + encodeURIComponent(id) + "/retry", {
        method: "POST", headers: CONSOLE, credentials: "same-origin",
      });
      const text = await response.text();
      if (response.ok) {
        const body = JSON.parse(text);
        const n = body.requeued.length;
        say(message, n ? "job " + id + ": " + n + " job(s) queued again" : "job " + id + ": nothing was failed any more", "ok");
        window.setTimeout(function () { window.location.reload(); }, 1200);
      } else {
        button.disabled = false;
        say(message, "job " + id + ": " + detail(response.status, text), "error");
      }
    });
  });

  // --- live progress -------------------------------------------------------------------------
  function watched() {
    return Array.from(document.querySelectorAll("[data-job]")).filter(function (el) {
      return !TERMINAL.has(el.dataset.state);
    });
  }

  function show(el, p) {
    const state = el.querySelector(".state");
    const bar = el.querySelector("progress");
    const count = el.querySelector(".count");
    el.dataset.state = p.state;
    state.dataset.state = p.state;
    state.textContent = p.state.replace("_", " ");
    if (p.total > 0) {
      bar.max = p.total;
      bar.value = p.finished;
      count.textContent = p.finished.toLocaleString() + " / " + p.total.toLocaleString();
    } else if (p.terminal) {
      bar.max = 1;
      bar.value = 1;
    }
  }

  async function poll() {
    const open = watched();
    if (!open.length) return;
    if (!document.hidden) {
      const ids = Array.from(new Set(open.map(function (el) { return el.dataset.job; })));
      const query = ids.map(function (id) { return "job=" + encodeURIComponent(id); }).join("&");
      try {
        const response = await fetch(base + "/console/progress?" + query, { credentials: "same-origin" });
        if (response.status === 401) { window.location.assign(base + "/sign-in"); return; }
        if (response.ok) {
          const found = await response.json();
          let finished = false;
          open.forEach(function (el) {
            const p = found[el.dataset.job];
            if (!p) return;
            show(el, p);
            finished = finished || p.terminal;
          });
          if (finished) {
            // counts, links and reasons are drawn by the server: fetch the page again
            window.setTimeout(function () { window.location.reload(); }, 600);
            return;
          }
        }
      } catch (e) { /* the server restarts: try again */ }
    }
    window.setTimeout(poll, POLL_MS);
  }

  if (watched().length) window.setTimeout(poll, POLL_MS);
})();
