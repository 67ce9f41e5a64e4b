// Lamina chat page: vanilla JS, no build step, no dependency. Talks to this server's OpenAI-compatible API.
"use strict";

(() => {
  const MAX_SIDE = 2048; // images are re-encoded upright (EXIF applied) and at most this many pixels per side
  const STORE = "lamina.";
  const $ = (id) => document.getElementById(id);
  const el = {
    model: $("model"), status: $("server-status"), newChat: $("new-chat"),
    settingsToggle: $("settings-toggle"), settings: $("settings"),
    temperature: $("temperature"), temperatureValue: $("temperature-value"), maxTokens: $("max-tokens"),
    useExperts: $("use-experts"), apiKey: $("api-key"),
    log: $("log"), empty: $("empty"),
    composer: $("composer"), prompt: $("prompt"), file: $("file"), send: $("send"), stop: $("stop"),
    attachment: $("attachment"), attachmentImg: $("attachment-img"), attachmentInfo: $("attachment-info"),
    attachmentRemove: $("attachment-remove"), composerError: $("composer-error"), drop: $("drop-overlay"),
  };

  const state = {
    history: [],        // messages as sent to /v1/chat/completions
    attachment: null,   // {url, width, height, name, bytes}
    controller: null,   // AbortController of the generation in flight
    modelsTimer: null,
    askedForKey: false, // the settings were opened to ask for a key
    conversation: 0,    // bumped by "New chat": a generation stopped by it must not touch the new one
  };

  // ------------------------------------------------------------------------------ small helpers
  function store(key, value) {
    try {
      if (value === undefined) return localStorage.getItem(STORE + key);
      if (value === null || value === "") localStorage.removeItem(STORE + key);
      else localStorage.setItem(STORE + key, String(value));
    } catch { /* storage disabled: settings just are not remembered */ }
    return null;
  }

  function h(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === null || v === undefined || v === false) continue;
      if (k === "class") node.className = v;
      else if (k === "text") node.textContent = v;
      else if (k.startsWith("data-") || k.startsWith("aria-") || k === "role" || k === "tabindex") node.setAttribute(k, v);
      else node[k] = v;
    }
    for (const c of children) if (c !== null && c !== undefined) node.append(c);
    return node;
  }

  function fmtSeconds(s) {
    if (typeof s !== "number" || !isFinite(s)) return "";
    if (s >= 1) return s.toFixed(2) + " s";
    const ms = Math.round(s * 1000);
    return ms < 1 ? "<1 ms" : ms + " ms";
  }
  const EXPERT_NAMES = { ocr: "OCR", detection: "Detection", caption: "Caption" };
  const expertName = (name) => EXPERT_NAMES[name] || name;
  const fmtBytes = (n) => (n > 1048576 ? (n / 1048576).toFixed(1) + " MB" : Math.max(1, Math.round(n / 1024)) + " kB");
  const pct = (score) => (typeof score === "number" ? Math.round(score * 100) + "%" : "");

  function apiHeaders(json) {
    const headers = {};
    if (json) headers["Content-Type"] = "application/json";
    const key = el.apiKey.value.trim();
    if (key) headers["Authorization"] = "Bearer " + key;
    return headers;
  }

  async function errorMessage(res) {
    let text = "";
    try { text = await res.text(); } catch { /* ignore */ }
    try {
      const body = JSON.parse(text);
      const e = body.error ?? body.detail ?? body;
      if (typeof e === "string") return e;
      if (e && e.message) return e.message;
      return JSON.stringify(e);
    } catch {
      return text.trim() || `${res.status} ${res.statusText}`;
    }
  }

  function setStatus(text, isError) {
    el.status.textContent = text || "";
    el.status.classList.toggle("error", !!isError);
  }

  function nearBottom() {
    return el.log.scrollHeight - el.log.scrollTop - el.log.clientHeight < 80;
  }

  function scrollDown(force) {
    if (force || nearBottom()) el.log.scrollTop = el.log.scrollHeight;
  }

  // ------------------------------------------------------------------------------ settings
  function loadSettings() {
    el.apiKey.value = store("apiKey") || "";
    const t = store("temperature");
    if (t !== null && t !== "" && !isNaN(+t)) el.temperature.value = t;
    const m = store("maxTokens");
    if (m && +m > 0) el.maxTokens.value = m;
    if (store("experts") === "off") el.useExperts.checked = false;
    el.temperatureValue.textContent = (+el.temperature.value).toFixed(2);
  }

  el.temperature.addEventListener("input", () => {
    el.temperatureValue.textContent = (+el.temperature.value).toFixed(2);
    store("temperature", el.temperature.value);
  });
  el.maxTokens.addEventListener("change", () => store("maxTokens", el.maxTokens.value));
  el.useExperts.addEventListener("change", () => store("experts", el.useExperts.checked ? null : "off"));
  el.apiKey.addEventListener("change", () => {
    store("apiKey", el.apiKey.value.trim());
    el.apiKey.closest(".field").classList.remove("needed");
    loadModels();
  });
  el.settingsToggle.addEventListener("click", () => showSettings(el.settings.hidden));

  function showSettings(open) {
    el.settings.hidden = !open;
    el.settingsToggle.setAttribute("aria-expanded", String(open));
  }

  // ------------------------------------------------------------------------------ models
  async function loadModels() {
    clearTimeout(state.modelsTimer);
    let res;
    try {
      res = await fetch("/v1/models", { headers: apiHeaders(false), cache: "no-store" });
    } catch {
      setStatus("The server is unreachable; retrying…", true);
      state.modelsTimer = setTimeout(loadModels, 3000);
      return;
    }
    if (res.status === 401) {
      setStatus("This server needs an API key: enter it in Settings.", true);
      state.askedForKey = true;
      showSettings(true);
      el.apiKey.closest(".field").classList.add("needed");
      el.apiKey.focus();
      return;
    }
    if (!res.ok) {
      const message = await errorMessage(res);
      setStatus(message, res.status !== 503);
      state.modelsTimer = setTimeout(loadModels, res.status === 503 ? 2000 : 5000);
      return;
    }
    const body = await res.json();
    const ids = (body.data || []).map((m) => m.id).filter(Boolean);
    const previous = el.model.value || store("model");
    el.model.replaceChildren(...ids.map((id) => h("option", { value: id, text: id })));
    if (!ids.length) el.model.append(h("option", { value: "", text: "no model loaded" }));
    if (ids.includes(previous)) el.model.value = previous;
    setStatus(ids.length ? "" : "The server has no model loaded.", !ids.length);
    if (state.askedForKey) { state.askedForKey = false; showSettings(false); } // the key works: out of the way
  }
  el.model.addEventListener("change", () => store("model", el.model.value));

  // ------------------------------------------------------------------------------ images
  async function prepareImage(file) {
    if (!file || !/^image\//.test(file.type || "")) throw new Error("That is not an image file.");
    let bitmap;
    try {
      bitmap = await createImageBitmap(file, { imageOrientation: "from-image" });
    } catch {
      throw new Error(`This browser cannot read that image (${file.type || "unknown type"}).`);
    }
    const scale = Math.min(1, MAX_SIDE / Math.max(bitmap.width, bitmap.height));
    const width = Math.max(1, Math.round(bitmap.width * scale));
    const height = Math.max(1, Math.round(bitmap.height * scale));
    const canvas = document.createElement("canvas");
    canvas.width = width;
    canvas.height = height;
    const ctx = canvas.getContext("2d");
    const lossless = /png|gif|bmp/i.test(file.type); // keep screenshots of text sharp for OCR
    if (!lossless) { ctx.fillStyle = "#fff"; ctx.fillRect(0, 0, width, height); }
    ctx.drawImage(bitmap, 0, 0, width, height);
    bitmap.close();
    const blob = await new Promise((resolve) => canvas.toBlob(resolve, lossless ? "image/png" : "image/jpeg", 0.92));
    if (!blob) throw new Error("Could not encode the image.");
    const url = await new Promise((resolve, reject) => {
      const reader = new FileReader();
      reader.onload = () => resolve(reader.result);
      reader.onerror = () => reject(new Error("Could not read the image."));
      reader.readAsDataURL(blob);
    });
    return { url, width, height, name: file.name || "pasted image", bytes: blob.size };
  }

  async function attach(file) {
    showComposerError("");
    try {
      setAttachment(await prepareImage(file));
    } catch (e) {
      showComposerError(e.message);
    }
  }

  function setAttachment(image) {
    state.attachment = image;
    el.attachment.hidden = !image;
    if (image) {
      el.attachmentImg.src = image.url;
      el.attachmentInfo.textContent = `${image.name} · ${image.width}×${image.height} · ${fmtBytes(image.bytes)}`;
    } else {
      el.attachmentImg.removeAttribute("src");
      el.file.value = "";
    }
  }

  el.file.addEventListener("change", () => { if (el.file.files[0]) attach(el.file.files[0]); });
  el.attachmentRemove.addEventListener("click", () => { setAttachment(null); el.prompt.focus(); });

  window.addEventListener("paste", (e) => {
    const item = [...(e.clipboardData?.items || [])].find((i) => i.kind === "file" && i.type.startsWith("image/"));
    if (!item) return; // plain text pastes go on as usual
    e.preventDefault();
    attach(item.getAsFile());
  });

  const hasFiles = (e) => [...(e.dataTransfer?.types || [])].includes("Files");
  let dragDepth = 0;
  window.addEventListener("dragenter", (e) => { if (hasFiles(e)) { dragDepth++; el.drop.hidden = false; } });
  window.addEventListener("dragleave", () => { if (--dragDepth <= 0) { dragDepth = 0; el.drop.hidden = true; } });
  window.addEventListener("dragover", (e) => { if (hasFiles(e)) { e.preventDefault(); e.dataTransfer.dropEffect = "copy"; } });
  window.addEventListener("drop", (e) => {
    if (!hasFiles(e)) return;
    e.preventDefault();
    dragDepth = 0;
    el.drop.hidden = true;
    const file = [...e.dataTransfer.files].find((f) => f.type.startsWith("image/"));
    if (file) attach(file);
    else showComposerError("Drop an image file (PNG, JPEG, WebP, GIF or BMP).");
  });

  // ------------------------------------------------------------------------------ experts
  // Boxes may come as [x1, y1, x2, y2], {x1, y1, x2, y2}, {x, y, width|w, height|h}, or a polygon [[x, y], ...];
  // in pixels of the image that was sent (or normalised to 0..1).
  function toBox(raw, width, height) {
    let b = raw;
    if (!b) return null;
    if (Array.isArray(b) && b.length && Array.isArray(b[0])) {
      const xs = b.map((p) => +p[0]), ys = b.map((p) => +p[1]);
      b = [Math.min(...xs), Math.min(...ys), Math.max(...xs), Math.max(...ys)];
    } else if (!Array.isArray(b) && typeof b === "object") {
      if ("x1" in b) b = [b.x1, b.y1, b.x2, b.y2];
      else if ("x" in b) b = [b.x, b.y, b.x + (b.width ?? b.w), b.y + (b.height ?? b.h)];
      else if ("left" in b) b = [b.left, b.top, b.left + b.width, b.top + b.height];
      else return null;
    }
    if (!Array.isArray(b) || b.length !== 4) return null;
    let [x1, y1, x2, y2] = b.map(Number);
    if (![x1, y1, x2, y2].every(isFinite)) return null;
    if (Math.max(x1, y1, x2, y2) <= 1.0 && width > 2 && height > 2) { x1 *= width; x2 *= width; y1 *= height; y2 *= height; }
    const clamp = (v, hi) => Math.min(Math.max(v, 0), hi);
    [x1, x2] = [clamp(Math.min(x1, x2), width), clamp(Math.max(x1, x2), width)];
    [y1, y2] = [clamp(Math.min(y1, y2), height), clamp(Math.max(y1, y2), height)];
    if (x2 - x1 <= 0 || y2 - y1 <= 0) return null;
    return [x1, y1, x2, y2];
  }

  function itemKind(item) {
    const type = String(item.type || "").toLowerCase();
    if (type.includes("ocr") || type.includes("text") || (item.text !== undefined && item.label === undefined && item.box)) return "text";
    if (type.includes("caption") || (item.text !== undefined && !item.box)) return "caption";
    return "object";
  }

  function renderFigure(image, reports) {
    const figure = h("div", { class: "figure" }, h("img", { src: image.url, alt: "The image with what the experts found" }));
    let count = 0;
    reports.forEach((report, r) => {
      (Array.isArray(report.data) ? report.data : []).forEach((item, i) => {
        if (!item || typeof item !== "object") return;
        const box = toBox(item.box ?? item.bbox ?? item.points ?? item.polygon, image.width, image.height);
        if (!box) return;
        const kind = itemKind(item);
        const label = kind === "text" ? String(item.text ?? "") : String(item.label ?? item.name ?? "object");
        const short = label.length > 28 ? label.slice(0, 27) + "…" : label;
        const tag = kind === "text" ? short : `${short} ${pct(item.score)}`.trim();
        const div = h("div", {
          class: "box" + (kind === "text" ? " text-box" : ""), "data-label": label, "data-kind": kind,
          "data-ref": `${r}:${i}`, title: tag,
        }, h("span", { class: "tag", text: tag }));
        const [x1, y1, x2, y2] = box;
        div.style.left = (100 * x1 / image.width) + "%";
        div.style.top = (100 * y1 / image.height) + "%";
        div.style.width = (100 * (x2 - x1) / image.width) + "%";
        div.style.height = (100 * (y2 - y1) / image.height) + "%";
        if (y1 / image.height < 0.07) div.classList.add("tag-inside"); // no room above: label inside
        if (y2 / image.height > 0.93) div.classList.add("tag-below");  // no room below (text boxes)
        figure.append(div);
        count++;
      });
    });
    return count ? figure : null;
  }

  function renderReport(report, r, figure) {
    const name = String(report.name ?? "expert");
    const status = String(report.status ?? (report.error ? "error" : "ok"));
    const head = h("div", { class: "report-head" },
      h("span", { class: "report-name", text: expertName(name) }),
      h("span", { class: "report-time", text: fmtSeconds(report.seconds) }),
      status !== "ok" ? h("span", { class: `report-status ${status}`, text: status }) : null);
    const node = h("div", { class: `report ${name.toLowerCase()}`, "data-expert": name }, head);
    if (report.text) node.append(h("p", { class: "report-text", text: String(report.text) }));
    else if (!report.error) node.append(h("p", { class: "report-text muted", text: "(nothing found)" }));
    if (report.error) node.append(h("p", { class: "report-error", text: String(report.error) }));
    const items = (Array.isArray(report.data) ? report.data : []).map((item, i) => [item, i])
      .filter(([item]) => item && typeof item === "object" && itemKind(item) === "object" && (item.label ?? item.name));
    if (items.length) {
      const list = h("ul", { class: "items", "aria-label": `${name} findings` });
      for (const [item, i] of items) {
        const li = h("li", { tabindex: "0" }, String(item.label ?? item.name) + " ",
          h("span", { class: "score", text: pct(item.score) }));
        const box = figure?.querySelector(`[data-ref="${r}:${i}"]`);
        if (box) {
          const on = () => box.classList.add("hl"), off = () => box.classList.remove("hl");
          li.addEventListener("mouseenter", on); li.addEventListener("mouseleave", off);
          li.addEventListener("focus", on); li.addEventListener("blur", off);
        }
        list.append(li);
      }
      node.append(list);
    }
    return node;
  }

  // One panel per image: the image with its boxes beside each expert's text and time.
  function renderExperts(container, reports, images, firstNew) {
    container.replaceChildren();
    const groups = new Map();
    for (const report of reports) {
      if (!report || typeof report !== "object") continue;
      const index = Number.isInteger(report.image) ? report.image : 0;
      if (!groups.has(index)) groups.set(index, []);
      groups.get(index).push(report);
    }
    for (const [index, group] of [...groups.entries()].sort((a, b) => a[0] - b[0])) {
      const image = images[index];
      const which = images.length > 1 ? ` in image ${index + 1}` : "";
      const times = group.map((rep) => `${expertName(rep.name)} ${fmtSeconds(rep.seconds)}`.trim()).join(" · ");
      const summary = h("summary", {}, `What the experts saw${which}: ${times}`);
      const figure = image ? renderFigure(image, group) : null;
      const reportsNode = h("div", { class: "reports" }, ...group.map((rep, r) => renderReport(rep, r, figure)));
      const details = h("details", { class: "experts", "data-image": String(index) }, summary,
        h("div", { class: "experts-body" + (figure ? "" : " no-figure") }, figure, reportsNode));
      details.open = index >= firstNew;
      container.append(details);
    }
  }

  // ------------------------------------------------------------------------------ conversation
  function addUserBubble(text, image) {
    el.empty.hidden = true;
    const node = h("div", { class: "msg user" });
    if (image) node.append(h("img", { class: "thumb", src: image.url, alt: image.name }));
    if (text) node.append(h("p", { class: "text", text }));
    el.log.append(node);
    return node;
  }

  function addAssistantBubble(model) {
    const node = h("div", { class: "msg assistant streaming", "data-state": "streaming", "data-model": model, "aria-busy": "true" });
    const experts = h("div", { class: "experts-slot" });
    const waiting = h("p", { class: "waiting", text: "" });
    const text = h("p", { class: "text" });
    const meta = h("div", { class: "meta" });
    node.append(experts, waiting, text, meta);
    el.log.append(node);
    return { node, experts, waiting, text, meta };
  }

  function setBusy(busy) {
    el.send.hidden = busy;
    el.stop.hidden = !busy;
    el.log.setAttribute("aria-busy", String(busy));
  }

  function showComposerError(message) {
    el.composerError.textContent = message || "";
    el.composerError.hidden = !message;
  }

  // SSE over fetch: yields each event's data string ("[DONE]" included); comment lines are skipped.
  async function* sseEvents(body) {
    const reader = body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    try {
      for (;;) {
        const { value, done } = await reader.read();
        buffer += decoder.decode(value || new Uint8Array(), { stream: !done });
        const parts = buffer.split(/\r\n\r\n|\n\n|\r\r/);
        buffer = done ? "" : parts.pop();
        for (const part of parts) {
          const data = part.split(/\r\n|\n|\r/).filter((l) => l.startsWith("data:"))
            .map((l) => l.slice(5).replace(/^ /, "")).join("\n");
          if (data) yield data;
        }
        if (done) return;
      }
    } finally {
      reader.releaseLock();
    }
  }

  async function send() {
    if (state.controller) return;
    const question = el.prompt.value.trim();
    const image = state.attachment;
    if (!question && !image) { el.prompt.focus(); return; }
    const model = el.model.value;
    if (!model) { showComposerError("No model to ask: is the server ready (and the API key set)?"); return; }
    showComposerError("");

    const text = question || "Describe this image.";
    const content = image
      ? [{ type: "text", text }, { type: "image_url", image_url: { url: image.url } }]
      : text;
    const firstNew = state.history.flatMap((m) => (Array.isArray(m.content) ? m.content : []))
      .filter((p) => p.type === "image_url").length;
    state.history.push({ role: "user", content, _image: image });
    const userNode = addUserBubble(text, image);
    el.prompt.value = "";
    autosize();
    setAttachment(null);

    const images = state.history.filter((m) => m._image).map((m) => m._image); // in request order
    const body = {
      model,
      messages: state.history.map(({ role, content: c }) => ({ role, content: c })),
      stream: true,
      stream_options: { include_usage: true },
      temperature: +el.temperature.value,
      max_tokens: Math.max(1, Math.round(+el.maxTokens.value || 256)),
    };
    if (!el.useExperts.checked) body.experts = [];

    const ui = addAssistantBubble(model);
    ui.waiting.textContent = image && el.useExperts.checked ? "Looking at the image…" : "Thinking…";
    scrollDown(true);
    const controller = new AbortController();
    state.controller = controller;
    setBusy(true);

    const conversation = state.conversation;
    const started = performance.now();
    let firstToken = null, lastToken = null, chunks = 0, tokens = null, answer = "", finish = null, outcome = "done", error = null;
    try {
      const res = await fetch("/v1/chat/completions", {
        method: "POST", headers: apiHeaders(true), body: JSON.stringify(body), signal: controller.signal,
      });
      if (!res.ok) {
        error = await errorMessage(res);
        if (res.status === 401) {
          showSettings(true);
          el.apiKey.closest(".field").classList.add("needed");
        }
      } else {
        for await (const data of sseEvents(res.body)) {
          if (data === "[DONE]") break;
          let chunk;
          try { chunk = JSON.parse(data); } catch { continue; }
          if (chunk.error) { error = chunk.error.message || JSON.stringify(chunk.error); break; }
          if (Array.isArray(chunk.experts)) renderExperts(ui.experts, chunk.experts, images, firstNew);
          if (chunk.usage && typeof chunk.usage.completion_tokens === "number") tokens = chunk.usage.completion_tokens;
          const choice = (chunk.choices || []).find((c) => (c.index ?? 0) === 0);
          if (!choice) continue;
          const delta = choice.delta?.content ?? choice.text ?? "";
          if (delta) {
            lastToken = performance.now();
            if (firstToken === null) firstToken = lastToken;
            chunks++;
            answer += delta;
            ui.text.textContent = answer;
            ui.waiting.hidden = true;
          }
          if (choice.finish_reason) finish = choice.finish_reason;
          scrollDown(false);
        }
      }
    } catch (e) {
      if (e.name === "AbortError") outcome = "stopped";
      else error = `The connection failed: ${e.message}`;
    } finally {
      state.controller = null;
      setBusy(false);
    }
    if (error) outcome = "error";
    if (conversation !== state.conversation) return; // "New chat" cleared this one meanwhile

    ui.waiting.hidden = true;
    ui.node.classList.remove("streaming");
    ui.node.dataset.state = outcome;
    ui.node.removeAttribute("aria-busy");
    const elapsed = (performance.now() - started) / 1000;
    const meta = [];
    if (outcome === "stopped") meta.push(h("span", { class: "stopped", text: "Stopped" }));
    if (finish === "length") meta.push(h("span", { class: "stopped", text: "Reached max tokens" }));
    if (firstToken !== null) {
      // exact token counts come with the usage chunk; without one (stopped, error) count the text chunks
      const count = tokens ?? chunks, unit = tokens === null ? "chunk" : "token";
      const decode = (lastToken - firstToken) / 1000;
      meta.push(h("span", { text: `first token after ${fmtSeconds((firstToken - started) / 1000)}` }));
      meta.push(h("span", { text: `${count} ${unit}${count === 1 ? "" : "s"}` +
        (decode > 0.2 && count > 1 ? ` · ${((count - 1) / decode).toFixed(1)}/s` : "") }));
    }
    meta.push(h("span", { text: `${fmtSeconds(elapsed)} · ${model}` }));
    ui.meta.replaceChildren(...meta);
    if (error) ui.node.append(h("p", { class: "error", role: "alert", text: error }));

    if (answer) {
      state.history.push({ role: "assistant", content: answer });
    } else {
      // nothing came back: the turn is not part of the conversation; give the question back for a retry
      state.history.pop();
      userNode.classList.add("failed");
      if (!el.prompt.value) { el.prompt.value = question; autosize(); }
      if (image && !state.attachment) setAttachment(image);
      if (!error && outcome === "stopped") ui.text.textContent = "(stopped before the answer began)";
    }
    scrollDown(false);
    el.prompt.focus();
  }

  function stop() {
    if (state.controller) state.controller.abort();
  }

  function newChat() {
    stop();
    state.conversation++;
    state.history = [];
    el.log.replaceChildren(el.empty);
    el.empty.hidden = false;
    setAttachment(null);
    showComposerError("");
    el.prompt.focus();
  }

  function autosize() {
    el.prompt.style.height = "auto";
    el.prompt.style.height = Math.min(el.prompt.scrollHeight + 2, 180) + "px";
  }

  el.composer.addEventListener("submit", (e) => { e.preventDefault(); send(); });
  el.stop.addEventListener("click", stop);
  el.newChat.addEventListener("click", newChat);
  el.prompt.addEventListener("input", autosize);
  el.prompt.addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) { e.preventDefault(); el.composer.requestSubmit(); }
  });
  document.addEventListener("keydown", (e) => { if (e.key === "Escape" && state.controller) stop(); });

  loadSettings();
  loadModels();
  el.prompt.focus();
})();
