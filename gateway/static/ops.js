// ChatStream Cluster's ops page: polls admin/status every second and admin/history every
// 5 s with the admin key the user typed (sessionStorage, this tab only; never in the page).
// Every figure is put into the page as text.
(() => {
  "use strict";

  const KEY_STORAGE = "chatstream.adminKey";
  const STATUS_EVERY_MS = 1000;
  const HISTORY_EVERY_MS = 5000;
  const SVG = "http://www.w3.org/2000/svg";
  const $ = (id) => document.getElementById(id);

  function adminKey() {
    try {
      return sessionStorage.getItem(KEY_STORAGE) || "";
    } catch {
      return "";
    }
  }

  function setAdminKey(value) {
    try {
      if (value) sessionStorage.setItem(KEY_STORAGE, value);
      else sessionStorage.removeItem(KEY_STORAGE);
    } catch {
      /* storage disabled */
    }
  }

  function showNotice(text) {
    $("notice").textContent = text;
    $("notice").hidden = false;
  }

  function hideNotice() {
    $("notice").hidden = true;
  }

  function setKeyPanel(open) {
    $("key-panel").hidden = !open;
    $("key-toggle").setAttribute("aria-expanded", String(open));
  }

  async function getJSON(path) {
    const headers = {};
    const key = adminKey();
    if (key) headers.Authorization = "Bearer " + key;
    let resp;
    try {
      resp = await fetch(path, { headers, cache: "no-store", credentials: "same-origin" });
    } catch (err) {
      throw new Error(`Cannot reach the gateway: ${err.message}`);
    }
    if (resp.ok) return resp.json();
    let detail = "";
    try {
      detail = (await resp.json()).error.message;
    } catch {
      detail = resp.statusText;
    }
    if (resp.status === 401) {
      setKeyPanel(true);
      throw new Error(adminKey() ? "Admin key refused: check it above."
        : "Admin key needed: enter the gateway's --admin-key above.");
    }
    if (resp.status === 403) {
      throw new Error("This gateway has no --admin-key, so its admin endpoints answer local " +
        "clients only. Start it with --admin-key and enter the key above.");
    }
    throw new Error(`Error ${resp.status}: ${detail}`);
  }

  // --- figures ---------------------------------------------------------------------------
  const fmt = (n, digits = 1) => (n === null || n === undefined ? "–"
    : Number(n).toLocaleString(undefined, { maximumFractionDigits: digits }));
  const seconds = (s) => (s === null || s === undefined ? "–"
    : s < 1 ? `${Math.round(s * 1000)} ms` : `${fmt(s, 2)} s`);

  function renderStatus(s) {
    $("queue-depth").textContent = fmt(s.queue_depth, 0);
    $("queue-detail").textContent =
      `waiting for a permit ${s.waiting_for_permit} · not yet read by a worker ${s.undelivered_jobs}`;
    $("running").textContent = `${s.running} / ${s.capacity}`;
    const plural = (n, word) => `${n} ${word}${n === 1 ? "" : "s"}`;
    $("workers-count").textContent = `${plural(s.workers.length, "live worker")}` +
      (Array.isArray(s.gateways) ? ` · ${plural(s.gateways.length, "gateway")}` : "");
    const m = s.last_minute || {};
    $("tokens-per-s").textContent = fmt(m.tokens_per_s);
    $("tokens-detail").textContent = m.tokens === undefined ? ""
      : `${fmt(m.tokens, 0)} tokens relayed`;
    $("ttft").textContent = `${seconds(m.ttft_p50_s)} / ${seconds(m.ttft_p99_s)}`;
    $("ttft-detail").textContent = m.ttft_samples === undefined ? ""
      : `${m.ttft_samples} first tokens`;
    const rejected = m.rejected || {};
    const total = Object.values(rejected).reduce((a, b) => a + b, 0);
    $("rejected").textContent = fmt(total, 0);
    $("rejected-detail").textContent = Object.entries(rejected)
      .map(([reason, n]) => `${reason} ${n}`).join(" · ");
    renderModels(s.models || []);
    renderWorkers(s.workers);
    $("updated").textContent = `Updated ${new Date().toLocaleTimeString()}.`;
  }

  const COLUMNS = ["ID", "Host", "Device", "Model", "Running / max", "KV cache", "Tok/s",
    "Heartbeat", "State"];

  function cell(text, className) {
    const td = document.createElement("td");
    if (className) td.className = className;
    if (text instanceof Node) td.append(text);
    else td.textContent = text;
    return td;
  }

  function kvCell(w) {
    const used = w.kv_tokens_used;
    const total = w.kv_tokens_total;
    if (typeof used !== "number" || typeof total !== "number" || total <= 0) return "–";
    const pct = Math.min(100, (100 * used) / total);
    const wrap = document.createElement("span");
    const bar = document.createElement("span");
    bar.className = "kv";
    const fill = document.createElement("span");
    fill.style.width = `${pct.toFixed(1)}%`;
    bar.append(fill);
    wrap.append(bar, `${Math.round(pct)}% (${fmt(used, 0)} / ${fmt(total, 0)} tokens)`);
    return wrap;
  }

  const MODEL_COLUMNS = ["Model", "Queue depth", "Running / capacity", "Workers",
    "Waiting in workers", "Tok/s"];

  function renderModels(models) {
    const rows = models.map((m) => {
      const tr = document.createElement("tr");
      tr.dataset.model = m.name;
      const workers = m.serving === m.workers ? `${m.workers}`
        : `${m.serving} serving / ${m.workers} live`;
      tr.append(
        cell(m.name), cell(fmt(m.queue_depth, 0), "queue"),
        cell(`${m.running} / ${m.capacity}`, "running"),
        cell(m.workers === 0 ? "none (cold)" : workers, "model-workers"),
        cell(fmt(m.waiting_in_workers, 0)), cell(fmt(m.tokens_per_s)),
      );
      [...tr.children].forEach((td, i) => { td.dataset.label = MODEL_COLUMNS[i]; });
      return tr;
    });
    $("models").tBodies[0].replaceChildren(...rows);
    $("no-models").hidden = models.length > 0;
  }

  function renderWorkers(workers) {
    const rows = workers.map((w) => {
      const tr = document.createElement("tr");
      tr.dataset.workerId = w.id;
      const state = w.state || (w.draining ? "draining" : "serving");
      tr.append(
        cell(w.id), cell(w.host), cell(w.device), cell(w.model),
        cell(`${w.running} / ${w.max_batch}`, "running"), cell(kvCell(w), "kv-usage"),
        cell(fmt(w.tokens_per_s)), cell(`${fmt(w.last_heartbeat_s)} s ago`, "heartbeat"),
        cell(state, `state state-${state}`),
      );
      [...tr.children].forEach((td, i) => { td.dataset.label = COLUMNS[i]; });
      return tr;
    });
    $("workers").tBodies[0].replaceChildren(...rows);
    $("no-workers").hidden = workers.length > 0;
  }

  // One polyline per run of known values; a bucket no gateway sampled leaves a gap.
  function renderChart(svg, values, peakLabel, unit) {
    const known = values.filter((v) => v !== null && v !== undefined);
    const peak = known.length ? Math.max(...known) : 0;
    const top = peak > 0 ? peak : 1;
    const step = values.length > 1 ? 600 / (values.length - 1) : 600;
    const children = [];
    const base = document.createElementNS(SVG, "line");
    base.setAttribute("x1", "0");
    base.setAttribute("x2", "600");
    base.setAttribute("y1", "99");
    base.setAttribute("y2", "99");
    children.push(base);
    let run = [];
    const flush = () => {
      if (run.length) {
        const line = document.createElementNS(SVG, "polyline");
        line.setAttribute("points", (run.length === 1 ? [run[0], run[0]] : run).join(" "));
        children.push(line);
      }
      run = [];
    };
    values.forEach((v, i) => {
      if (v === null || v === undefined) {
        flush();
        return;
      }
      run.push(`${(i * step).toFixed(1)},${(98 - (94 * v) / top).toFixed(1)}`);
    });
    flush();
    svg.replaceChildren(...children);
    svg.dataset.peak = String(peak);
    peakLabel.textContent = `· peak ${fmt(peak)}${unit}`;
  }

  function renderHistory(h) {
    renderChart($("chart-queue"), h.points.map((p) => p.queue_depth), $("queue-peak"), "");
    renderChart($("chart-tokens"), h.points.map((p) => p.tokens_per_s), $("tokens-peak"),
      " tok/s");
  }

  // --- polling ---------------------------------------------------------------------------
  let statusTimer = null;
  let historyTimer = null;

  async function pollStatus() {
    clearTimeout(statusTimer);
    try {
      renderStatus(await getJSON("admin/status"));
      hideNotice();
      if (adminKey()) setKeyPanel(false);
      document.body.dataset.state = "ok";
    } catch (err) {
      showNotice(err.message);
      document.body.dataset.state = "error";
    }
    statusTimer = setTimeout(pollStatus, STATUS_EVERY_MS);
  }

  async function pollHistory() {
    clearTimeout(historyTimer);
    try {
      renderHistory(await getJSON("admin/history"));
    } catch {
      /* pollStatus reports the same failure */
    }
    historyTimer = setTimeout(pollHistory, HISTORY_EVERY_MS);
  }

  function init() {
    $("admin-key").value = adminKey();
    $("key-form").addEventListener("submit", (event) => {
      event.preventDefault();
      setAdminKey($("admin-key").value.trim());
      pollStatus();
      pollHistory();
    });
    $("key-toggle").addEventListener("click", () => setKeyPanel($("key-panel").hidden));
    pollStatus();
    pollHistory();
  }

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", init);
  else init();
})();
