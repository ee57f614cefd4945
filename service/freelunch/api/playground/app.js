// freelunch playground: builds its form from the model card (/v1/models lists the methods this
// model serves, each with its options' JSON schema), then calls the API like any client. No method
// is named here: each toggle and field comes from what the server declares. URLs are relative, so
// the page also works where a proxy serves the server under a sub-path (host/llm/).
"use strict";

let apiKey = "";  // the API key lives in this variable only: never in storage, never in a URL
let card = null;  // the served model's card
let imageUrl = null;  // the uploaded image, as a data: URL
let running = null;  // the AbortController of the run in progress

const $ = (id) => document.getElementById(id);

function authHeaders() {
  return apiKey ? { Authorization: "Bearer " + apiKey } : {};
}

function post(path, body, signal) {
  return fetch(path, { method: "POST", headers: { "Content-Type": "application/json", ...authHeaders() }, body: JSON.stringify(body), signal });
}

// "mean_accepted_tokens_per_step" -> "Mean accepted tokens per step"
function humanise(key) {
  const words = String(key).replace(/_/g, " ");
  return words.charAt(0).toUpperCase() + words.slice(1);
}

function formatValue(v) {
  if (typeof v === "number") return Number.isInteger(v) ? v.toLocaleString("en") : String(Number(v.toFixed(3)));
  if (v !== null && typeof v === "object") return JSON.stringify(v);
  return String(v);
}

function el(tag, props = {}, ...children) {
  const node = Object.assign(document.createElement(tag), props);
  node.append(...children);
  return node;
}

// An OpenAI-shaped error body -> {message, param, type}; anything else -> its text.
async function errorOf(response) {
  const text = await response.text();
  try {
    const body = JSON.parse(text);
    if (body && body.error) return body.error;
  } catch (e) { /* not JSON: show it as it came */ }
  return { message: text || response.statusText };
}

function showError(box, status, error) {
  box.hidden = false;
  box.replaceChildren(
    el("strong", { className: "status" }, status === null ? "error" : String(status)),
    " ", el("span", { className: "message" }, error.message || "request failed"),
    ...(error.param ? [" ", el("span", { className: "param" }, "(param: " + error.param + ")")] : []),
  );
}

// ---- the model card and the form built from it ---------------------------------------------

async function connect() {
  apiKey = $("api-key").value.trim();
  const banner = $("banner");
  banner.hidden = true;
  let response;
  try {
    response = await fetch("v1/models", { headers: authHeaders() });
  } catch (e) {
    return showError(banner, null, { message: "the server did not answer: " + e });
  }
  if (!response.ok) {
    const error = await errorOf(response);
    if (response.status === 401) error.message += " (type the server's API key above, then Connect)";
    $("model").textContent = "not connected";
    return showError(banner, response.status, error);
  }
  card = (await response.json()).data[0];
  $("model").textContent = "model: " + card.id + (card.max_model_len ? " · context " + card.max_model_len : "");
  $("image-row").hidden = !card.images;
  buildMethods(card.methods || []);
  $("run").disabled = false;
}

function resolve(schema, root) {
  const ref = schema && schema.$ref;
  return ref ? ((root.$defs || {})[ref.split("/").pop()] || {}) : (schema || {});
}

// What input a JSON-schema property gets: number, integer, string, boolean, enum, union (typed
// text), or skip (arrays and objects: prompts as messages or token ids stay with the API).
function fieldKind(prop, root) {
  prop = resolve(prop, root);
  let variants = (prop.anyOf || prop.oneOf || [prop]).map((v) => resolve(v, root));
  const nullable = variants.some((v) => v.type === "null");
  variants = variants.filter((v) => v.type !== "null");
  const scalar = (v) => ["string", "number", "integer", "boolean"].includes(v.type) || v.enum || v.const !== undefined;
  if (!variants.length || !variants.every(scalar)) return { kind: "skip" };
  if (variants.length > 1) return { kind: "union", nullable };
  const v = variants[0];
  const values = v.enum || (v.const !== undefined ? [v.const] : null);
  if (values) return { kind: "enum", values, nullable };
  const min = v.minimum !== undefined ? v.minimum : v.exclusiveMinimum;
  const max = v.maximum !== undefined ? v.maximum : v.exclusiveMaximum;
  return { kind: v.type, nullable, min, max };
}

function fieldInput(prop, kind, required) {
  const dflt = prop.default;
  if (kind.kind === "boolean") return el("input", { type: "checkbox", checked: dflt === true });
  if (kind.kind === "enum") {
    const select = el("select");
    if (!required && (dflt === undefined || dflt === null)) select.append(el("option", { value: "" }, "(server default)"));
    for (const value of kind.values) select.append(el("option", { value: JSON.stringify(value), selected: value === dflt }, String(value)));
    return select;
  }
  const input = el("input", { type: kind.kind === "number" || kind.kind === "integer" ? "number" : "text" });
  if (input.type === "number") {
    input.step = kind.kind === "integer" ? "1" : "any";
    if (kind.min !== undefined) input.min = kind.min;
    if (kind.max !== undefined) input.max = kind.max;
  }
  if (dflt !== undefined && dflt !== null) input.value = String(dflt);
  input.placeholder = kind.nullable || dflt === undefined ? "(empty: server default)" : "";
  return input;
}

function buildMethods(methods) {
  const box = $("methods");
  box.replaceChildren();
  if (!methods.length) box.append(el("p", { className: "muted" }, "This model is served with no decoding methods."));
  for (const m of methods) {
    const schema = m.options_schema || {};
    // a method the server applies by default (its flag) starts switched on: switching it off opts out
    const byDefault = Boolean(m.server_default);
    const toggle = el("input", { type: "checkbox", className: "toggle", checked: byDefault });
    const fields = el("div", { className: "fields", hidden: !byDefault });
    const head = el("label", { className: "method-name" }, toggle, " ", el("code", {}, m.option), " ", m.description);
    const part = el("div", { className: "method" }, head);
    part.dataset.option = m.option;
    if (m.requires && m.requires.length) part.append(el("p", { className: "hint" }, "needs a model with: " + m.requires.join(", ")));
    if (byDefault) part.append(el("p", { className: "hint" }, "on by this server's default: " + JSON.stringify(m.server_default)));
    for (const [name, raw] of Object.entries(schema.properties || {})) {
      const prop = resolve(raw, schema);
      const kind = fieldKind(prop, schema);
      if (kind.kind === "skip") continue;
      const input = fieldInput(prop, kind, (schema.required || []).includes(name));
      input.dataset.field = name;
      input.dataset.kind = kind.kind;
      // the description, cut to two lines on the page and whole in the tooltip
      fields.append(el("label", { className: "field", title: prop.description || "" }, el("span", {}, name), input,
        el("small", { className: "hint" }, prop.description || "")));
    }
    toggle.addEventListener("change", () => { fields.hidden = !toggle.checked; });
    part.append(fields);
    box.append(part);
  }
}

// What opts a request out of the server's default methods (the "Plain" run, and a default switched off).
function serverDefaultsOff() {
  const out = {};
  for (const m of (card && card.methods) || []) if (m.server_default && m.off_options) out[m.option] = m.off_options;
  return out;
}

// The options of each toggled method, as the request sends them (empty fields left out); a method
// the server applies by default and the user switched off is sent as its "off" options.
function methodOptions() {
  const out = {};
  const off = serverDefaultsOff();
  for (const part of document.querySelectorAll("#methods .method")) {
    if (!part.querySelector(".toggle").checked) {
      if (off[part.dataset.option]) out[part.dataset.option] = off[part.dataset.option];
      continue;
    }
    const options = {};
    for (const input of part.querySelectorAll("[data-field]")) {
      const kind = input.dataset.kind;
      if (kind === "boolean") { options[input.dataset.field] = input.checked; continue; }
      const raw = input.value.trim();
      if (raw === "") continue;
      if (kind === "enum") options[input.dataset.field] = JSON.parse(raw);
      else if (kind === "number" || kind === "integer") options[input.dataset.field] = Number(raw);
      else if (kind === "union") options[input.dataset.field] = /^(-?\d+(\.\d+)?|true|false)$/.test(raw) ? JSON.parse(raw) : raw;
      else options[input.dataset.field] = input.value;
    }
    out[part.dataset.option] = options;
  }
  return out;
}

function number(id, integer) {
  const raw = $(id).value.trim();
  return raw === "" ? undefined : integer ? parseInt(raw, 10) : Number(raw);
}

// The request without methods: {path, body}; throws an Error with a message for the page.
function plainRequest() {
  const chat = document.querySelector("input[name=mode]:checked").value === "chat";
  const body = { model: card.id, stream: true, stream_options: { include_usage: true }, ...serverDefaultsOff() };
  for (const [id, integer] of [["temperature", false], ["top_p", false], ["max_tokens", true], ["seed", true]]) {
    const v = number(id, integer);
    if (v !== undefined) body[id] = v;
  }
  const schemaText = $("schema").value.trim();
  if (schemaText) {
    let schema;
    try { schema = JSON.parse(schemaText); } catch (e) { throw new Error("the JSON schema box is not valid JSON: " + e.message); }
    body.response_format = { type: "json_schema", json_schema: { name: "output", schema } };
  }
  const prompt = $("prompt").value;
  if (!chat) return { path: "v1/completions", body: Object.assign(body, { prompt }) };
  const messages = [];
  if ($("system").value.trim()) messages.push({ role: "system", content: $("system").value });
  const content = imageUrl && card.images
    ? [{ type: "text", text: prompt }, { type: "image_url", image_url: { url: imageUrl } }]
    : prompt;
  messages.push({ role: "user", content });
  return { path: "v1/chat/completions", body: Object.assign(body, { messages }) };
}

// ---- running: stream one request into its panel ----------------------------------------------

function newPanel(title) {
  const node = $("answer-template").content.firstElementChild.cloneNode(true);
  node.querySelector("h2").textContent = title;
  $("answers").append(node);
  return node;
}

// Streams the request into `panel`; resolves to {text, tps, ttft, usage} or null on an error.
async function stream(path, body, panel, signal) {
  const textBox = panel.querySelector(".text");
  const errorBox = panel.querySelector(".error");
  panel.classList.add("running");
  const t0 = performance.now();
  let first = null, text = "", usage = null, finish = null, failed = false;
  try {
    const response = await post(path, body, signal);
    if (!response.ok) {
      showError(errorBox, response.status, await errorOf(response));
      return null;
    }
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true }).replace(/\r\n/g, "\n");
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const event = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        for (const line of event.split("\n")) {
          if (!line.startsWith("data:")) continue;
          const data = line.slice(5).trim();
          if (data === "[DONE]") continue;
          const chunk = JSON.parse(data);
          if (chunk.error) { showError(errorBox, "stream", chunk.error); failed = true; continue; }
          for (const choice of chunk.choices || []) {
            const piece = choice.delta ? choice.delta.content || "" : choice.text || "";
            if (piece) {
              if (first === null) first = performance.now();
              text += piece;
              textBox.textContent = text;
            }
            if (choice.finish_reason) finish = choice.finish_reason;
          }
          if (chunk.usage) usage = chunk.usage;
        }
      }
    }
  } catch (e) {
    showError(errorBox, null, { message: e.name === "AbortError" ? "stopped" : String(e) });
    return null;
  } finally {
    panel.classList.remove("running");
  }
  const end = performance.now();
  const tokens = usage ? usage.completion_tokens : 0;
  // decode speed: the tokens after the first, over the time after the first (prefill apart)
  const tps = first !== null && tokens > 1 && end > first ? (tokens - 1) / ((end - first) / 1000) : null;
  const ttft = first !== null ? first - t0 : null;
  showSpeed(panel, { tokens, tps, ttft, total: end - t0, usage, finish });
  showStats(panel, usage && usage.method_stats);
  return failed ? null : { text, tps, usage };
}

function showSpeed(panel, s) {
  const cached = s.usage && s.usage.prompt_tokens_details ? s.usage.prompt_tokens_details.cached_tokens : 0;
  const rows = [
    ["tokens/s", s.tps === null ? "–" : s.tps.toFixed(1), "tps"],
    ["time to first token", s.ttft === null ? "–" : Math.round(s.ttft) + " ms", "ttft"],
    ["total time", (s.total / 1000).toFixed(2) + " s", "total"],
    ["tokens", s.tokens + (s.usage ? " (prompt " + s.usage.prompt_tokens + ", cached " + cached + ")" : ""), "tokens"],
    ["finish reason", s.finish || "–", "finish"],
  ];
  panel.querySelector(".speed").replaceChildren(
    ...rows.map(([k, v, cls]) => el("tr", { className: cls }, el("th", {}, k), el("td", {}, v))));
}

// usage.method_stats: one small table per method, its keys in words.
function showStats(panel, stats) {
  const box = panel.querySelector(".stats");
  box.replaceChildren();
  for (const [option, values] of Object.entries(stats || {})) {
    const method = (card.methods || []).find((m) => m.option === option);
    const rows = Object.entries(values).map(([k, v]) => el("tr", {}, el("th", {}, humanise(k)), el("td", {}, formatValue(v))));
    box.append(el("table", { className: "method-stats" },
      el("caption", {}, el("code", {}, option), method ? " " + method.description : ""), ...rows));
  }
}

// ---- compare: a word-level diff of the two answers ---------------------------------------------

function words(text) {
  return text.match(/\s*\S+|\s+$/g) || [];
}

// Which words of a and b are outside their longest common subsequence (null: too long to diff).
function changedWords(a, b) {
  const n = a.length, m = b.length;
  if (n * m > 4e6) return null;
  const key = (w) => w.trim();
  const table = Array.from({ length: n + 1 }, () => new Uint32Array(m + 1));
  for (let i = n - 1; i >= 0; i--)
    for (let j = m - 1; j >= 0; j--)
      table[i][j] = key(a[i]) === key(b[j]) ? table[i + 1][j + 1] + 1 : Math.max(table[i + 1][j], table[i][j + 1]);
  const inA = new Array(n).fill(true), inB = new Array(m).fill(true);
  for (let i = 0, j = 0; i < n && j < m;) {
    if (key(a[i]) === key(b[j])) { inA[i++] = false; inB[j++] = false; }
    else if (table[i + 1][j] >= table[i][j + 1]) i++;
    else j++;
  }
  return [inA, inB];
}

function markWords(panel, list, changed, cls) {
  const nodes = list.flatMap((w, i) => {
    const [, space, word] = w.match(/^(\s*)(.*)$/s);
    if (!changed[i] || !word) return [w];
    // a run of changed words is one highlight: the space before a word joins it only within a run
    return i > 0 && changed[i - 1] ? [el("mark", { className: cls }, w)] : [space, el("mark", { className: cls }, word)];
  });
  panel.querySelector(".text").replaceChildren(...nodes);
}

function compareAnswers(panels, results) {
  const [a, b] = results.map((r) => words(r.text));
  const changed = changedWords(a, b);
  const summary = $("summary");
  const speed = results[0].tps && results[1].tps ? " With the methods: " + (results[1].tps / results[0].tps).toFixed(2) + "x plain's tokens/s." : "";
  if (changed === null) return (summary.textContent = "The answers are too long to compare word by word." + speed);
  markWords(panels[0], a, changed[0], "removed");
  markWords(panels[1], b, changed[1], "added");
  const only = changed.map((c, i) => c.filter((x, k) => x && [a, b][i][k].trim()).length);
  summary.textContent = (only[0] + only[1] === 0
    ? "The two answers are identical, word for word."
    : "Differences highlighted: " + only[0] + " words only in the plain answer, " + only[1] + " only in the answer with methods.") + speed;
}

// A one-token request first puts the prompt in the prefix cache, so that neither compared run's
// time to first token gains from the other's prefill. Its failure is the plain run's to show.
async function warmPrompt(plain, signal) {
  const body = { ...plain.body, stream: false, max_tokens: 1 };
  delete body.stream_options;
  try {
    await post(plain.path, body, signal);
  } catch (e) { /* stopped, or the server is gone: the runs say so */ }
}

async function run() {
  if (running || !card) return;
  delete document.body.dataset.done;
  $("banner").hidden = true;
  $("summary").textContent = "";
  let plain;
  try { plain = plainRequest(); } catch (e) { return showError($("banner"), null, { message: e.message }); }
  const methods = methodOptions();
  const withMethods = { ...plain.body, ...methods };
  const off = serverDefaultsOff();
  const names = Object.keys(methods).filter((name) => methods[name] !== off[name]);
  const label = names.length ? "With " + names.join(" + ") : "Plain (no method on)";
  const runs = $("compare").checked ? [["Plain", plain.body], [label, withMethods]] : [[label, withMethods]];
  $("answers").replaceChildren();
  $("answers").classList.toggle("two", runs.length === 2);
  const panels = runs.map(([title]) => newPanel(title));
  running = new AbortController();
  $("run").disabled = true;
  $("stop").disabled = false;
  const results = [];
  try {
    if (runs.length === 2) await warmPrompt(plain, running.signal);
    for (let i = 0; i < runs.length; i++) {  // one after the other: comparable speeds on a small machine
      results.push(await stream(plain.path, runs[i][1], panels[i], running.signal));
      if (running.signal.aborted) break;
    }
  } finally {
    running = null;
    $("run").disabled = false;
    $("stop").disabled = true;
  }
  if (results.length === 2 && results.every((r) => r)) compareAnswers(panels, results);
  document.body.dataset.done = String(Date.now());  // a signal for scripted checks
}

// ---- wiring ---------------------------------------------------------------------------------------

function setMode() {
  const chat = document.querySelector("input[name=mode]:checked").value === "chat";
  for (const node of document.querySelectorAll(".chat-only")) node.classList.toggle("off", !chat);
}

document.addEventListener("DOMContentLoaded", () => {
  $("connect").addEventListener("click", connect);
  $("api-key").addEventListener("keydown", (e) => { if (e.key === "Enter") connect(); });
  $("api-key").addEventListener("input", () => { apiKey = $("api-key").value.trim(); });  // a run uses the key as typed
  $("run").addEventListener("click", run);
  $("stop").addEventListener("click", () => running && running.abort());
  for (const radio of document.querySelectorAll("input[name=mode]")) radio.addEventListener("change", setMode);
  document.addEventListener("keydown", (e) => { if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) run(); });
  $("image").addEventListener("change", () => {
    const file = $("image").files[0];
    const preview = $("image-preview");
    if (!file) { imageUrl = null; preview.hidden = true; return; }
    const reader = new FileReader();
    reader.onload = () => { imageUrl = reader.result; preview.src = imageUrl; preview.hidden = false; };
    reader.readAsDataURL(file);
  });
  setMode();
  connect();
});
