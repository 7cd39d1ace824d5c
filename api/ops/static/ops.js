// The operators' console: refresh the overview, log in, and replay dead letters.
// Plain JavaScript, no build and no CDN; every number comes from /api/v1/ops/ (JSON).
"use strict";

(function () {
  const csrfMeta = document.querySelector('meta[name="csrf-token"]');
  const csrf = csrfMeta ? csrfMeta.content : "";

  async function call(method, url, body, withCsrf) {
    const headers = { "Accept": "application/json" };
    if (body !== undefined) headers["Content-Type"] = "application/json";
    if (withCsrf) headers["X-CSRF-Token"] = csrf;
    const response = await fetch(url, {
      method, headers, credentials: "same-origin",
      body: body === undefined ? undefined : JSON.stringify(body),
    });
    let data = null;
    try { data = await response.json(); } catch (e) { data = null; }
    if (!response.ok) {
      const detail = data && data.detail ? data.detail : response.statusText;
      throw new Error(response.status + " " + detail);
    }
    return data;
  }

  function text(el, value) { if (el) el.textContent = value; }
  function fmt(v, digits) {
    if (v === null || v === undefined) return "–";
    return typeof v === "number" ? String(Math.round(v * 10 ** digits) / 10 ** digits) : String(v);
  }
  function get(obj, path) { return path.split(".").reduce((o, k) => (o == null ? o : o[k]), obj); }
  function rows(tbody, items, cells, empty) {
    tbody.replaceChildren();
    if (!items.length && empty) {
      const tr = document.createElement("tr"); const td = document.createElement("td");
      td.colSpan = 3; td.textContent = empty; tr.appendChild(td); tbody.appendChild(tr); return;
    }
    for (const item of items) {
      const tr = document.createElement("tr");
      const values = cells(item);
      if (values.cls) tr.className = values.cls;
      for (const v of values.cells) { const td = document.createElement("td"); td.textContent = v; tr.appendChild(td); }
      tbody.appendChild(tr);
    }
  }

  // Overview: poll every 2 s.
  async function refreshOverview() {
    let view;
    try { view = await call("GET", "/api/v1/ops/overview"); }
    catch (e) { text(document.getElementById("updated"), "refresh failed: " + e.message); return; }
    for (const el of document.querySelectorAll("[data-field]")) {
      const v = get(view, el.dataset.field);
      if (el.hasAttribute("data-percent")) text(el, v == null ? "–" : fmt(v * 100, 1) + "%");
      else text(el, fmt(v, el.dataset.field.endsWith("p99_ms") ? 2 : 1));
    }
    for (const [name, p] of Object.entries(view.processes)) {
      const tile = document.querySelector('[data-process="' + name + '"]');
      if (!tile) continue;
      tile.className = "tile " + p.status; tile.title = p.error || "";
      text(tile.querySelector("[data-status]"), p.status);
    }
    rows(document.querySelector("#lag tbody"), Object.entries(view.lag.partitions), ([tp, n]) => ({ cells: [tp, n] }));
    text(document.getElementById("lag-error"), view.lag.error || "");
    rows(document.querySelector("#dead-letters tbody"), Object.entries(view.dead_letters), ([t, n]) => ({ cells: [t, n] }));
    rows(document.querySelector("#breakers tbody"), view.breakers,
      (b) => ({ cls: b.state, cells: [b.instance, b.state, b.failures] }), "no calls yet");
    const stamp = Date.now();
    for (const img of document.querySelectorAll("img[data-chart]")) {
      img.src = img.src.split("?")[0] + "?t=" + stamp;
    }
    text(document.getElementById("updated"), view.at ? "updated " + new Date(view.at * 1000).toLocaleTimeString() : "waiting for the first scrape");
  }

  // Log in through the JSON API, then go where the user was going.
  function setupLogin(form) {
    form.addEventListener("submit", async (event) => {
      event.preventDefault();
      try {
        await call("POST", "/api/v1/sessions", {
          email: form.querySelector("#email").value, password: form.querySelector("#password").value,
        });
        window.location.assign(form.dataset.next || "/ops");
      } catch (e) { text(document.getElementById("login-error"), "Login failed: " + e.message); }
    });
  }

  // Replay: a dry-run preview first, then the real thing with the CSRF token.
  function setupReplay() {
    const panel = document.getElementById("replay-panel");
    const preview = document.getElementById("replay-preview");
    const result = document.getElementById("replay-result");
    const force = document.getElementById("force");
    let pending = null;

    async function ask(body) {
      pending = null; panel.hidden = true; text(result, "");
      try {
        const dry = await call("POST", "/api/v1/ops/dead-letters/replay", { ...body, dry_run: true, force: force.checked });
        let message = "Dry run: would replay " + dry.replayed.length + " of " + dry.matched + " dead letter(s)";
        if (dry.skipped.length) message += "; " + dry.skipped.length + " skipped (replayed before)";
        if (dry.missing.length) message += "; " + dry.missing.length + " not found";
        text(preview, message + ".");
        pending = body; panel.hidden = false;
        document.getElementById("replay-confirm").disabled = dry.replayed.length === 0;
      } catch (e) { text(result, "Preview failed: " + e.message); }
    }

    document.getElementById("replay-cancel").addEventListener("click", () => { pending = null; panel.hidden = true; });
    document.getElementById("replay-confirm").addEventListener("click", async () => {
      if (!pending) return;
      const body = pending; pending = null; panel.hidden = true;
      try {
        const done = await call("POST", "/api/v1/ops/dead-letters/replay", { ...body, dry_run: false, force: force.checked }, true);
        text(result, "Replayed " + done.replayed.length + ", skipped " + done.skipped.length + " (by " + done.replayed_by + ").");
        for (const id of done.replayed) {
          const row = document.querySelector('tr[data-id="' + CSS.escape(id) + '"]');
          if (row) { row.classList.add("replayed"); text(row.querySelector(".replayed-cell"), "yes"); }
        }
      } catch (e) { text(result, "Replay failed: " + e.message); }
    });

    const picks = () => Array.from(document.querySelectorAll("input.pick:checked")).map((el) => el.value);
    const selected = document.getElementById("preview-selected");
    if (selected) {
      const sync = () => { selected.disabled = picks().length === 0; };
      document.addEventListener("change", (e) => { if (e.target.classList && e.target.classList.contains("pick")) sync(); });
      const all = document.getElementById("select-all");
      all.addEventListener("change", () => { for (const el of document.querySelectorAll("input.pick")) el.checked = all.checked; sync(); });
      selected.addEventListener("click", () => ask({ ids: picks() }));
    }
    const byFilter = document.getElementById("preview-filter");
    if (byFilter) {
      const filter = JSON.parse(document.getElementById("filter-json").textContent);
      byFilter.addEventListener("click", () => ask({ filter }));
    }
    const one = document.getElementById("preview-one");
    if (one) one.addEventListener("click", () => ask({ ids: [one.dataset.id] }));
  }

  const login = document.getElementById("login");
  if (login) setupLogin(login);
  if (document.getElementById("replay-panel")) setupReplay();
  if (document.body.dataset.page === "overview") {
    refreshOverview();
    setInterval(refreshOverview, 2000);
  }
})();
