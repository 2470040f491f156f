// ChatStream Cluster's chat page: plain JavaScript, no build step, nothing from a CDN.
//
// It speaks ChatStream's wire: POST chat_stream answers text/plain where every chunk is the
// whole reply so far followed by <::EOS::>, with the reply's id in the header
// X-ChatStream-Last-Generated-Message-Id; the conversation lives in the server's session,
// named by the HttpOnly `sid` cookie the browser sends by itself. Model output is only ever
// put into the page as text (textContent), never as HTML.
(() => {
  "use strict";

  const EOS = "<::EOS::>";
  const MESSAGE_ID_HEADER = "X-ChatStream-Last-Generated-Message-Id";
  const KEY_STORAGE = "chatstream.apiKey";
  const PARAMS = ["temperature", "top_k_value", "top_p_value"];

  const $ = (id) => document.getElementById(id);
  const config = readConfig();
  const labels = Object.assign(
    { send: "Send", stop: "Stop", regenerate: "Regenerate", placeholder: "Type a message" },
    config.labels || {},
  );
  const els = {
    messages: $("messages"), input: $("input"), send: $("send"), stop: $("stop"),
    composer: $("composer"), notice: $("notice"), clear: $("clear"),
    settings: $("settings"), settingsToggle: $("settings-toggle"), keyForm: $("key-form"),
    key: $("api-key"), paramsForm: $("params-form"),
  };
  let running = null; // {controller} while a reply streams
  let synced = Promise.resolve(); // the start-up session sync; turns wait for it

  function readConfig() {
    try {
      return JSON.parse($("chatstream-config").textContent || "{}");
    } catch {
      return {};
    }
  }

  // --- the API key (sessionStorage: this tab only) ---------------------------------------
  function apiKey() {
    try {
      return sessionStorage.getItem(KEY_STORAGE) || "";
    } catch {
      return "";
    }
  }

  function setApiKey(value) {
    try {
      if (value) sessionStorage.setItem(KEY_STORAGE, value);
      else sessionStorage.removeItem(KEY_STORAGE);
    } catch {
      /* storage disabled: the key lives until the page closes */
    }
  }

  function call(path, { method = "GET", body, signal } = {}) {
    const headers = {};
    if (body !== undefined) headers["Content-Type"] = "application/json";
    const key = apiKey();
    if (key) headers.Authorization = "Bearer " + key;
    return fetch(path, {
      method, headers, signal, credentials: "same-origin", cache: "no-store",
      body: body === undefined ? undefined : JSON.stringify(body),
    });
  }

  // --- notices ---------------------------------------------------------------------------
  function showNotice(text, kind = "error") {
    els.notice.textContent = text;
    els.notice.dataset.kind = kind;
    els.notice.hidden = false;
  }

  function hideNotice() {
    els.notice.hidden = true;
    els.notice.textContent = "";
  }

  function openSettings(focusKey) {
    els.settings.hidden = false;
    els.settingsToggle.setAttribute("aria-expanded", "true");
    if (focusKey) els.key.focus();
  }

  async function errorMessage(resp) {
    let detail = "";
    try {
      const body = await resp.json();
      detail = (body.error && body.error.message) || body.message || "";
    } catch {
      detail = resp.statusText || "";
    }
    const retry = parseInt(resp.headers.get("Retry-After") || "", 10);
    switch (resp.status) {
      case 401:
        openSettings(true);
        return apiKey()
          ? "API key refused: check the key in Settings."
          : "API key needed: this server wants an API key. Enter it in Settings.";
      case 409:
        return "One turn at a time: this conversation is already generating a reply " +
          "(perhaps in another tab). Wait for it to finish, then send again.";
      case 429:
        return `Busy: the server cannot take this request now, retry in ${
          Number.isFinite(retry) ? retry : 1} s. (${detail})`;
      case 503:
        return `Unavailable: ${detail || "the server cannot serve this now"}` +
          (Number.isFinite(retry) ? ` Retry in ${retry} s.` : "");
      default:
        return `Error ${resp.status}: ${detail || "the request failed"}`;
    }
  }

  // --- messages --------------------------------------------------------------------------
  function scrollToEnd() {
    const root = document.scrollingElement || document.documentElement;
    root.scrollTop = root.scrollHeight;
  }

  function addMessage(role, text, extraClass) {
    const li = document.createElement("li");
    li.className = `msg ${role}` + (extraClass ? " " + extraClass : "");
    const who = document.createElement("div");
    who.className = "who";
    who.textContent = role === "user" ? "You" : "Assistant";
    const body = document.createElement("div");
    body.className = "text";
    body.textContent = text;
    const status = document.createElement("div");
    status.className = "status";
    const actions = document.createElement("div");
    actions.className = "actions";
    li.append(who, body, status, actions);
    els.messages.append(li);
    scrollToEnd();
    return li;
  }

  function replyView(li) {
    const body = li.querySelector(".text");
    const status = li.querySelector(".status");
    return {
      li,
      begin(messageId) {
        li.dataset.messageId = messageId || "";
        li.classList.remove("stopped", "cut", "done");
        li.classList.add("streaming");
        status.textContent = "";
        body.textContent = "";
        li.querySelector(".actions").replaceChildren();
      },
      setText(text) {
        body.textContent = text;
        scrollToEnd();
      },
      finish(outcome) {
        li.classList.remove("streaming");
        li.classList.add(outcome);
        if (outcome === "stopped") status.textContent = "Stopped: this reply is incomplete.";
        if (outcome === "cut") {
          status.textContent = "Cut off: the connection ended before the reply was complete.";
        }
        if (outcome === "done" && !body.textContent) status.textContent = "(empty reply)";
      },
    };
  }

  function lastReply() {
    const replies = els.messages.querySelectorAll("li.assistant:not(.welcome)");
    return replies.length ? replies[replies.length - 1] : null;
  }

  function refreshActions() {
    const last = lastReply();
    for (const li of els.messages.querySelectorAll("li.assistant:not(.welcome)")) {
      const actions = li.querySelector(".actions");
      actions.replaceChildren();
      if (li.classList.contains("streaming") || !li.dataset.messageId) continue;
      actions.append(feedbackButton(li, true), feedbackButton(li, false));
      if (li === last && config.regenerateEnabled !== false) {
        const again = document.createElement("button");
        again.type = "button";
        again.className = "regenerate";
        again.textContent = labels.regenerate;
        again.addEventListener("click", () => regenerate(li));
        actions.append(again);
      }
    }
  }

  function feedbackButton(li, isLike) {
    const button = document.createElement("button");
    button.type = "button";
    button.className = isLike ? "like" : "dislike";
    button.textContent = isLike ? "Like" : "Dislike";
    const given = li.dataset.feedback;
    button.setAttribute("aria-pressed", String(given === (isLike ? "like" : "dislike")));
    button.addEventListener("click", () => sendFeedback(li, isLike));
    return button;
  }

  async function sendFeedback(li, isLike) {
    let resp;
    try {
      resp = await call("set_feedback", {
        method: "POST", body: { is_like: isLike, message_id: li.dataset.messageId, form_data: {} },
      });
    } catch (err) {
      showNotice(`Cannot reach the server: ${err.message}`);
      return;
    }
    if (!resp.ok) {
      showNotice(await errorMessage(resp));
      return;
    }
    li.dataset.feedback = isLike ? "like" : "dislike";
    hideNotice();
    refreshActions();
  }

  function showWelcome() {
    if (config.welcomeMessage) addMessage("assistant", config.welcomeMessage, "welcome");
  }

  // --- one streamed turn -----------------------------------------------------------------
  function setRunning(controller) {
    running = controller ? { controller } : null;
    els.send.hidden = Boolean(controller);
    els.stop.hidden = !controller;
    els.clear.disabled = false;
    document.body.classList.toggle("busy", Boolean(controller));
  }

  // Streams one /chat_stream answer into `view`. `refused(message)` runs when no reply
  // started (an HTTP error, no connection, or stopped while waiting).
  async function stream(body, view, refused) {
    const controller = new AbortController();
    setRunning(controller);
    let resp;
    try {
      resp = await call("chat_stream", { method: "POST", body, signal: controller.signal });
    } catch (err) {
      setRunning(null);
      refused(controller.signal.aborted ? "Stopped before the reply started."
        : `Cannot reach the server: ${err.message}`);
      return;
    }
    if (!resp.ok) {
      const message = await errorMessage(resp);
      setRunning(null);
      refused(message);
      return;
    }
    hideNotice();
    view.begin(resp.headers.get(MESSAGE_ID_HEADER));
    const reader = resp.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    let outcome = "done";
    try {
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer += decoder.decode(value, { stream: true });
        const end = buffer.lastIndexOf(EOS);
        if (end < 0) continue;
        const head = buffer.slice(0, end);
        const start = head.lastIndexOf(EOS);
        view.setText(start < 0 ? head : head.slice(start + EOS.length));
        buffer = buffer.slice(end + EOS.length);
      }
    } catch {
      outcome = controller.signal.aborted ? "stopped" : "cut";
    }
    view.finish(outcome);
    setRunning(null);
    refreshActions();
  }

  async function send(text) {
    await synced;
    const user = addMessage("user", text);
    const li = addMessage("assistant", "", "streaming");
    await stream({ user_input: text, regenerate: false }, replyView(li), (message) => {
      user.remove();
      li.remove();
      if (!els.input.value) els.input.value = text;
      showNotice(message);
    });
  }

  async function regenerate(li) {
    if (running) return;
    await stream({ regenerate: true }, replyView(li), (message) => showNotice(message));
  }

  // --- session, params, key --------------------------------------------------------------
  async function clearContext() {
    if (running) running.controller.abort();
    let resp;
    try {
      resp = await call("clear_context", { method: "POST", body: {} });
    } catch (err) {
      showNotice(`Cannot reach the server: ${err.message}`);
      return false;
    }
    if (!resp.ok) {
      showNotice(await errorMessage(resp));
      return false;
    }
    els.messages.replaceChildren();
    showWelcome();
    hideNotice();
    return true;
  }

  async function loadParams() {
    const resp = await call("get_generation_params").catch(() => null);
    if (!resp || !resp.ok) return;
    const params = (await resp.json()).generation_params || {};
    for (const name of PARAMS) if (params[name] !== undefined) $(name).value = params[name];
  }

  async function saveParams(event) {
    event.preventDefault();
    const body = {};
    for (const name of PARAMS) {
      const value = $(name).value;
      if (value !== "") body[name] = Number(value);
    }
    const resp = await call("set_generation_params", { method: "POST", body }).catch(
      (err) => ({ ok: false, failed: err }),
    );
    if (resp.failed) showNotice(`Cannot reach the server: ${resp.failed.message}`);
    else if (!resp.ok) showNotice(await errorMessage(resp));
    else showNotice("Generation settings saved for this conversation.", "info");
  }

  // On load, the server's session is made to match the empty page (ChatStream's
  // clearContextOnReload); without access (401) the settings open to ask for the key.
  async function syncSession(clear) {
    if (clear) {
      const resp = await call("clear_context", { method: "POST", body: {} }).catch(() => null);
      if (resp && resp.status === 401) {
        openSettings(false);
        if (!apiKey()) showNotice("API key needed: enter it in Settings to chat.", "info");
        return;
      }
    }
    await loadParams();
  }

  function init() {
    document.title = config.title || document.title;
    els.input.placeholder = labels.placeholder;
    els.send.textContent = labels.send;
    els.stop.textContent = labels.stop;
    els.key.value = apiKey();
    if (config.apiKeyRequired) openSettings(false);
    showWelcome();

    els.composer.addEventListener("submit", (event) => {
      event.preventDefault();
      const text = els.input.value;
      if (running || !text.trim()) return;
      els.input.value = "";
      autoGrow();
      send(text);
    });
    els.input.addEventListener("keydown", (event) => {
      if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
        event.preventDefault();
        els.composer.requestSubmit();
      }
    });
    els.input.addEventListener("input", autoGrow);
    els.stop.addEventListener("click", () => running && running.controller.abort());
    els.clear.addEventListener("click", clearContext);
    els.settingsToggle.addEventListener("click", () => {
      const open = els.settings.hidden;
      els.settings.hidden = !open;
      els.settingsToggle.setAttribute("aria-expanded", String(open));
    });
    els.keyForm.addEventListener("submit", (event) => {
      event.preventDefault();
      setApiKey(els.key.value.trim());
      showNotice(apiKey() ? "API key saved for this tab." : "API key removed.", "info");
      syncSession(config.clearContextOnReload !== false && !lastReply());
    });
    els.paramsForm.addEventListener("submit", saveParams);
    synced = syncSession(config.clearContextOnReload !== false).finally(() => {
      document.body.dataset.ready = "true";
    });
  }

  function autoGrow() {
    els.input.style.height = "auto";
    els.input.style.height = Math.min(els.input.scrollHeight, 200) + "px";
  }

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", init);
  else init();
})();
