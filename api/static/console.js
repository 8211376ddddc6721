// colstream console: plain JavaScript, no build step, no dependencies.
// Every data request carries the API key the user typed once (sessionStorage).
"use strict";

(() => {
  const KEY_STORAGE = "colstream.apiKey";
  const THUMB_WIDTH = 320;
  const LARGE_WIDTH = 1200;
  const SETTLED = new Set(["complete", "partial", "failed"]);
  const $ = (id) => document.getElementById(id);
  const authRequired = document.body.dataset.authRequired === "true";

  const state = {
    session: null,
    documents: new Map(),
    watchers: new Map(), // document_id -> callback(row)
    thumbUrls: [],
    eventsAbort: null,
    eventsRetry: null,
  };

  // -- key and requests -------------------------------------------------------------------
  const getKey = () => sessionStorage.getItem(KEY_STORAGE) || "";

  class ApiError extends Error {
    constructor(status, detail) {
      super(detail);
      this.status = status;
    }
  }

  function headers(extra) {
    const h = new Headers(extra || {});
    const key = getKey();
    if (key) h.set("X-API-Key", key);
    return h;
  }

  async function detailOf(response) {
    try {
      const body = await response.json();
      if (typeof body.detail === "string") return body.detail;
      if (body.detail) return JSON.stringify(body.detail);
      return JSON.stringify(body);
    } catch (_) {
      return `${response.status} ${response.statusText}`;
    }
  }

  async function api(path, options) {
    const opts = options || {};
    const response = await fetch(path, { ...opts, headers: headers(opts.headers) });
    if (!response.ok) {
      const detail = await detailOf(response);
      if (response.status === 401) askForKey(detail);
      throw new ApiError(response.status, detail);
    }
    return response;
  }

  const canCall = () => !authRequired || getKey() !== "";
  const hasScope = (scope) => {
    const scopes = (state.session && state.session.scopes) || [];
    return scopes.includes("admin") || scopes.includes(scope);
  };

  function docPath(documentId) {
    return documentId.split("/").map(encodeURIComponent).join("/");
  }

  function notice(message) {
    const el = $("notice");
    el.textContent = message || "";
    el.hidden = !message;
  }

  // -- key dialog -------------------------------------------------------------------------
  function askForKey(reason) {
    const dialog = $("key-dialog");
    $("key-error").hidden = !reason;
    $("key-error").textContent = reason || "";
    $("api-key").value = "";
    if (!dialog.open) dialog.showModal();
    $("api-key").focus();
  }

  function bindKeyDialog() {
    $("key-button").addEventListener("click", () => askForKey(""));
    $("key-form").addEventListener("submit", (event) => {
      event.preventDefault();
      const value = $("api-key").value.trim();
      if (!value) return;
      sessionStorage.setItem(KEY_STORAGE, value);
      $("key-dialog").close();
      start();
    });
    $("key-forget").addEventListener("click", () => {
      sessionStorage.removeItem(KEY_STORAGE);
      $("key-dialog").close();
      stopEvents();
      state.session = null;
      notice("The API key was removed from this tab.");
    });
    $("key-cancel").addEventListener("click", () => $("key-dialog").close());
  }

  // -- tabs -------------------------------------------------------------------------------
  const VIEWS = ["search", "documents", "upload", "dead-letters"];

  function showView(name) {
    const view = VIEWS.includes(name) ? name : "search";
    for (const v of VIEWS) {
      const tab = $(`tab-${v}`);
      const selected = v === view;
      tab.setAttribute("aria-selected", String(selected));
      tab.tabIndex = selected ? 0 : -1;
      $(`view-${v}`).hidden = !selected;
    }
    if (view === "dead-letters" && state.session) loadDeadLetters();
  }

  function bindTabs() {
    window.addEventListener("hashchange", () => showView(location.hash.slice(1)));
    $("tabs").addEventListener("keydown", (event) => {
      if (event.key !== "ArrowRight" && event.key !== "ArrowLeft") return;
      const current = VIEWS.indexOf(location.hash.slice(1) || "search");
      const next = VIEWS[(current + (event.key === "ArrowRight" ? 1 : VIEWS.length - 1)) % VIEWS.length];
      location.hash = next;
      $(`tab-${next}`).focus();
      event.preventDefault();
    });
    showView(location.hash.slice(1));
  }

  // -- session ----------------------------------------------------------------------------
  async function loadSession() {
    const session = await (await api("/console/session")).json();
    state.session = session;
    $("random-weights").hidden = !session.random_weights;
    $("model-name").textContent = session.model || "";
    const filters = $("filters");
    filters.querySelectorAll(".field").forEach((el) => el.remove());
    for (const key of session.indexed_metadata) {
      if (session.tenant && key === "tenant") continue; // a tenant key sees its own tenant only
      const field = document.createElement("div");
      field.className = "field";
      const id = `filter-${key}`;
      field.innerHTML = `<label for="${id}"></label><input id="${id}" data-key="" autocomplete="off">`;
      field.querySelector("label").textContent = key;
      field.querySelector("input").dataset.key = key;
      filters.appendChild(field);
    }
    filters.hidden = filters.querySelectorAll(".field").length === 0;
    $("key-button").textContent = session.authenticated ? "API key ✓" : "API key";
  }

  // -- search -----------------------------------------------------------------------------
  function clearThumbs() {
    for (const url of state.thumbUrls) URL.revokeObjectURL(url);
    state.thumbUrls = [];
  }

  async function pageImageUrl(documentId, page, width) {
    const response = await api(`/documents/${docPath(documentId)}/pages/${page}/image?width=${width}`);
    const url = URL.createObjectURL(await response.blob());
    state.thumbUrls.push(url);
    return url;
  }

  function resultCard(hit, model) {
    const li = document.createElement("li");
    li.className = "card";
    li.dataset.documentId = hit.document_id;
    li.dataset.page = String(hit.page_number);
    const label = `page ${hit.page_number} of ${hit.document_id}`;
    li.innerHTML =
      '<button type="button" class="thumb"><img alt=""></button>' +
      "<dl><dt>Document</dt><dd class=\"doc\"></dd><dt>Page</dt><dd class=\"page\"></dd>" +
      "<dt>Score</dt><dd class=\"score\"></dd><dt>Model</dt><dd class=\"model\"></dd></dl>";
    li.querySelector(".doc").textContent = hit.document_id;
    li.querySelector(".page").textContent = String(hit.page_number);
    li.querySelector(".score").textContent = Number(hit.score).toFixed(4);
    li.querySelector(".model").textContent = hit.model || model || "";
    const button = li.querySelector("button");
    button.setAttribute("aria-label", `Open ${label} large`);
    const img = li.querySelector("img");
    img.alt = `Thumbnail of ${label}`;
    pageImageUrl(hit.document_id, hit.page_number, THUMB_WIDTH)
      .then((url) => { img.src = url; })
      .catch((error) => { img.alt = `No image for ${label}: ${error.message}`; });
    button.addEventListener("click", () => openLarge(hit.document_id, hit.page_number, label));
    return li;
  }

  async function openLarge(documentId, page, label) {
    const dialog = $("page-dialog");
    $("page-title").textContent = `${documentId}, page ${page}`;
    const img = $("page-large");
    img.alt = `Large view of ${label}`;
    img.removeAttribute("src");
    dialog.showModal();
    $("page-close").focus();
    try {
      img.src = await pageImageUrl(documentId, page, Math.min(LARGE_WIDTH, state.session.page_image_max_width));
    } catch (error) {
      img.alt = `No image: ${error.message}`;
    }
  }

  async function search(event) {
    event.preventDefault();
    const status = $("search-status");
    const query = $("query").value.trim();
    if (!query) return;
    const filter = {};
    $("filters").querySelectorAll("input[data-key]").forEach((input) => {
      const value = input.value.trim();
      if (value) filter[input.dataset.key] = value;
    });
    const body = { query, limit: Number($("top-k").value) };
    if (Object.keys(filter).length) body.filter = filter;
    status.textContent = "Searching…";
    try {
      const data = await (await api("/search", {
        method: "POST",
        headers: { "Content-Type": "application/json" },
        body: JSON.stringify(body),
      })).json();
      const hits = data.results || data.hits || [];
      clearThumbs();
      const list = $("results");
      list.replaceChildren(...hits.map((hit) => resultCard(hit, data.model)));
      status.textContent = hits.length ? `${hits.length} pages` : "No matching pages.";
    } catch (error) {
      status.textContent = `Search failed: ${error.message}`;
    }
  }

  // -- documents and live events ----------------------------------------------------------
  function formatTime(value) {
    const date = new Date(value);
    return Number.isNaN(date.getTime()) ? "" : date.toLocaleString();
  }

  function renderDocuments() {
    const body = $("documents-body");
    const rows = [...state.documents.values()].sort((a, b) => a.document_id.localeCompare(b.document_id));
    body.replaceChildren(...rows.map(documentRow));
    $("documents-status").textContent = rows.length ? `${rows.length} documents` : "No documents yet.";
  }

  function documentRow(doc) {
    const tr = document.createElement("tr");
    tr.dataset.documentId = doc.document_id;
    tr.dataset.state = doc.state;
    tr.innerHTML =
      '<th scope="row" class="doc"></th><td><span class="state"></span></td><td class="pages"></td>' +
      '<td class="failed"></td><td class="version"></td><td class="updated"></td><td class="actions"></td>';
    tr.querySelector(".doc").textContent = doc.filename && doc.filename !== doc.document_id
      ? `${doc.document_id} (${doc.filename})` : doc.document_id;
    const badge = tr.querySelector(".state");
    badge.textContent = doc.state;
    badge.classList.add(`state-${doc.state}`);
    if (doc.error) {
      const reason = document.createElement("div");
      reason.className = "reason";
      reason.textContent = doc.error;
      tr.querySelector(".doc").appendChild(reason);
    }
    tr.querySelector(".pages").textContent = `${doc.indexed_pages} of ${doc.total_pages || "?"}`;
    tr.querySelector(".failed").textContent = (doc.failed_pages || []).join(", ") || "—";
    tr.querySelector(".version").textContent = String(doc.version);
    tr.querySelector(".updated").textContent = formatTime(doc.updated_at);
    if (hasScope("delete")) {
      const button = document.createElement("button");
      button.type = "button";
      button.className = "danger";
      button.textContent = "Delete";
      button.setAttribute("aria-label", `Delete ${doc.document_id}`);
      button.addEventListener("click", () => deleteDocument(doc.document_id, button));
      tr.querySelector(".actions").appendChild(button);
    }
    return tr;
  }

  async function deleteDocument(documentId, button) {
    if (!window.confirm(`Delete ${documentId} and all its pages?`)) return;
    button.disabled = true;
    try {
      await api(`/document/${docPath(documentId)}`, { method: "DELETE" });
      $("documents-status").textContent = `Delete of ${documentId} published.`;
    } catch (error) {
      button.disabled = false;
      $("documents-status").textContent = `Delete failed: ${error.message}`;
    }
  }

  function applyDocument(row) {
    state.documents.set(row.document_id, row);
    const watcher = state.watchers.get(row.document_id);
    if (watcher) watcher(row);
  }

  function handleEvent(type, data) {
    if (type === "snapshot") {
      state.documents.clear();
      for (const row of data) applyDocument(row);
    } else if (type === "document") {
      applyDocument(data);
    } else if (type === "removed") {
      state.documents.delete(data.document_id);
    } else if (type === "unavailable") {
      $("documents-status").textContent = `Records unavailable: ${data.detail}`;
      return;
    }
    renderDocuments();
  }

  function stopEvents() {
    if (state.eventsAbort) state.eventsAbort.abort();
    state.eventsAbort = null;
    clearTimeout(state.eventsRetry);
  }

  // EventSource cannot send the API key, so the stream is read through fetch.
  async function startEvents() {
    stopEvents();
    const controller = new AbortController();
    state.eventsAbort = controller;
    try {
      const response = await api("/console/events", { signal: controller.signal });
      const reader = response.body.getReader();
      const decoder = new TextDecoder();
      let buffer = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer += decoder.decode(value, { stream: true });
        let cut;
        while ((cut = buffer.indexOf("\n\n")) >= 0) {
          const block = buffer.slice(0, cut);
          buffer = buffer.slice(cut + 2);
          let type = "message";
          const data = [];
          for (const line of block.split("\n")) {
            if (line.startsWith("event:")) type = line.slice(6).trim();
            else if (line.startsWith("data:")) data.push(line.slice(5).trim());
          }
          if (data.length) handleEvent(type, JSON.parse(data.join("\n")));
        }
      }
    } catch (error) {
      if (controller.signal.aborted) return;
      $("documents-status").textContent = `Live updates interrupted: ${error.message}; reconnecting…`;
      if (error instanceof ApiError && (error.status === 401 || error.status === 403)) return;
    }
    if (!controller.signal.aborted) state.eventsRetry = setTimeout(startEvents, 2000);
  }

  // -- upload -----------------------------------------------------------------------------
  function documentIdFor(name) {
    let id = name.replace(/[^A-Za-z0-9._:@=+-]/g, "-").replace(/\.{2,}/g, ".").slice(0, 200);
    if (!/^[A-Za-z0-9]/.test(id)) id = `upload-${id}`;
    return id.replace(/\.$/, "");
  }

  function uploadItem(file, documentId) {
    const li = document.createElement("li");
    li.dataset.documentId = documentId;
    li.innerHTML = '<span class="name"></span><progress max="100" value="0"></progress><span class="upload-state"></span>';
    li.querySelector(".name").textContent = file.name;
    const progress = li.querySelector("progress");
    progress.setAttribute("aria-label", `Progress of ${file.name}`);
    $("uploads").prepend(li);
    return {
      li,
      set(percent, text, stateName) {
        progress.value = percent;
        li.querySelector(".upload-state").textContent = text;
        if (stateName) li.dataset.state = stateName;
      },
    };
  }

  function sendFile(file, documentId, item) {
    const isPdf = file.type === "application/pdf" || /\.pdf$/i.test(file.name);
    const form = new FormData();
    form.append("file", file, file.name);
    form.append("document_id", documentId);
    return new Promise((resolve, reject) => {
      const xhr = new XMLHttpRequest();
      xhr.open("POST", `/ingest/${isPdf ? "pdf" : "image"}?wait=false`);
      const key = getKey();
      if (key) xhr.setRequestHeader("X-API-Key", key);
      xhr.responseType = "json";
      xhr.upload.addEventListener("progress", (event) => {
        if (event.lengthComputable) item.set(Math.round((event.loaded / event.total) * 30), "uploading");
      });
      xhr.addEventListener("load", () => {
        const body = xhr.response || {};
        if (xhr.status >= 200 && xhr.status < 300) resolve(body);
        else reject(new ApiError(xhr.status, typeof body.detail === "string" ? body.detail : JSON.stringify(body.detail || body)));
      });
      xhr.addEventListener("error", () => reject(new ApiError(0, "network error")));
      xhr.send(form);
    });
  }

  async function upload(file) {
    const documentId = documentIdFor(file.name);
    const item = uploadItem(file, documentId);
    item.set(0, "uploading");
    try {
      const accepted = await sendFile(file, documentId, item);
      const version = accepted.version;
      item.set(30, "queued", "queued");
      const follow = (row) => {
        if (version != null && row.version < version) return;
        const total = row.total_pages || 0;
        const done = row.indexed_pages + (row.failed_pages || []).length;
        const share = total ? Math.round((done / total) * 70) : 0;
        const text = total ? `${row.state}: ${row.indexed_pages} of ${total} pages indexed` : row.state;
        item.set(30 + share, row.error ? `${text} (${row.error})` : text, row.state);
        if (SETTLED.has(row.state)) state.watchers.delete(documentId);
      };
      state.watchers.set(documentId, follow);
      const known = state.documents.get(documentId);
      if (known) follow(known);
    } catch (error) {
      item.set(0, `failed: ${error.message}`, "error");
    }
  }

  function bindUpload() {
    const zone = $("drop-zone");
    const input = $("file-input");
    input.addEventListener("change", () => {
      for (const file of input.files) upload(file);
      input.value = "";
    });
    zone.addEventListener("dragover", (event) => { event.preventDefault(); zone.classList.add("over"); });
    zone.addEventListener("dragleave", () => zone.classList.remove("over"));
    zone.addEventListener("drop", (event) => {
      event.preventDefault();
      zone.classList.remove("over");
      for (const file of event.dataTransfer.files) upload(file);
    });
  }

  // -- dead letters -----------------------------------------------------------------------
  async function loadDeadLetters() {
    const status = $("dlq-status");
    const body = $("dlq-body");
    if (!hasScope("admin")) {
      body.replaceChildren();
      status.textContent = "Dead letters need an API key with the admin scope.";
      return;
    }
    status.textContent = "Loading…";
    try {
      const data = await (await api("/dead-letters?limit=200")).json();
      body.replaceChildren(...data.dead_letters.map(deadLetterRow));
      status.textContent = data.dead_letters.length ? `${data.dead_letters.length} dead letters` : "No dead letters.";
    } catch (error) {
      status.textContent = `Could not read dead letters: ${error.message}`;
    }
  }

  function deadLetterRow(letter) {
    const tr = document.createElement("tr");
    tr.dataset.position = letter.dlq_offset;
    tr.innerHTML = '<td class="at"></td><td class="stage"></td><td class="type"></td><td class="message"></td>' +
      '<td class="doc"></td><td class="position"></td><td class="actions"></td>';
    tr.querySelector(".at").textContent = formatTime(letter.failed_at);
    tr.querySelector(".stage").textContent = letter.stage;
    tr.querySelector(".type").textContent = letter.error_type;
    tr.querySelector(".message").textContent = letter.message;
    tr.querySelector(".doc").textContent =
      (letter.document_id || letter.original_key || "—") + (letter.page_number ? `, page ${letter.page_number}` : "");
    tr.querySelector(".position").textContent = letter.dlq_offset;
    const button = document.createElement("button");
    button.type = "button";
    button.className = "secondary";
    button.textContent = "Redrive";
    button.setAttribute("aria-label", `Redrive dead letter ${letter.dlq_offset}`);
    button.addEventListener("click", () => redrive(letter.dlq_offset, button));
    tr.querySelector(".actions").appendChild(button);
    return tr;
  }

  async function redrive(position, button) {
    button.disabled = true;
    const status = $("dlq-status");
    try {
      const data = await (await api("/dead-letters/redrive", {
        method: "POST",
        headers: { "Content-Type": "application/json" },
        body: JSON.stringify({ offsets: [position] }),
      })).json();
      const outcome = data.outcomes[0];
      status.textContent = outcome
        ? `${position}: ${outcome.action}${outcome.reason ? ` (${outcome.reason})` : ""}`
        : `${position}: already sent with another letter of the same record`;
    } catch (error) {
      button.disabled = false;
      status.textContent = `Redrive failed: ${error.message}`;
    }
  }

  // -- start ------------------------------------------------------------------------------
  async function start() {
    notice("");
    if (!canCall()) {
      askForKey("");
      return;
    }
    try {
      await loadSession();
    } catch (error) {
      if (error.status !== 401) notice(`The console could not start: ${error.message}`);
      return;
    }
    renderDocuments();
    startEvents();
    if (location.hash === "#dead-letters") loadDeadLetters();
  }

  document.addEventListener("DOMContentLoaded", () => {
    bindKeyDialog();
    bindTabs();
    bindUpload();
    $("search-form").addEventListener("submit", search);
    $("dlq-refresh").addEventListener("click", loadDeadLetters);
    $("page-close").addEventListener("click", () => $("page-dialog").close());
    start();
  });
})();
