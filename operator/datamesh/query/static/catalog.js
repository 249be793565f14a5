// The catalog page's script: it calls the query API as the visitor and shows what comes back.
// Every value from the API reaches the page as text (textContent, createTextNode, setAttribute
// on plain attributes): no HTML is ever built from data, so nothing a product holds can run here.
"use strict";

const TOKEN_KEY = "datamesh.token";
const PHASES = new Set(["Pending", "Provisioning", "Ready", "Degraded", "Failed"]);
const STATUSES = new Set(["True", "False", "Unknown"]);
const SAMPLE_ROWS = 5;

// ---- DOM helpers --------------------------------------------------------------------------------

function el(tag, options, ...children) {
  const node = document.createElement(tag);
  const { className, title, data } = options || {};
  if (className) node.className = className;
  if (title) node.setAttribute("title", title);
  for (const [key, value] of Object.entries(data || {})) node.dataset[key] = value;
  for (const child of children) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

function byId(id) {
  return document.getElementById(id);
}

function fill(parent, nodes) {
  parent.replaceChildren(...nodes);
}

function busy(id, on) {
  // aria-busy tells assistive technology (and the browser tests) that a part is being refreshed.
  byId(id).setAttribute("aria-busy", on ? "true" : "false");
}

function say(id, text, isError) {
  const node = byId(id);
  node.textContent = text || "";
  node.classList.toggle("error", Boolean(isError));
}

function number(value, digits) {
  return typeof value === "number" ? value.toFixed(digits) : "–";
}

function keyText(key) {
  // A composite primary key comes as a list of values.
  return Array.isArray(key) ? key.map(String).join(" / ") : String(key);
}

function valueText(value) {
  if (value === null || value === undefined) return "–";
  return typeof value === "object" ? JSON.stringify(value) : String(value);
}

// ---- the API, as the visitor ----------------------------------------------------------------------

class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

function token() {
  return sessionStorage.getItem(TOKEN_KEY) || "";
}

function detailOf(body, status) {
  const detail = body && body.detail;
  if (typeof detail === "string") return detail;
  if (Array.isArray(detail)) return detail.map((d) => `${(d.loc || []).join(".")}: ${d.msg}`).join("; ");
  return `HTTP ${status}`;
}

async function api(path, options) {
  const headers = { Accept: "application/json" };
  if (token()) headers.Authorization = `Bearer ${token()}`;
  const init = { method: "GET", headers, credentials: "omit", cache: "no-store" };
  if (options && options.body !== undefined) {
    init.method = "POST";
    headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(options.body);
  }
  const response = await fetch(path, init);
  let body = null;
  try {
    body = await response.json();
  } catch (_) {
    body = null; // a proxy's HTML error page: the status says enough
  }
  if (!response.ok) {
    const hint = response.status === 401 ? " (enter a valid token above)" : "";
    throw new ApiError(response.status, detailOf(body, response.status) + hint);
  }
  return body;
}

function productPath(product) {
  const [namespace, name] = product.split("/");
  return `/v1/products/${encodeURIComponent(namespace)}/${encodeURIComponent(name)}`;
}

// ---- the product list -----------------------------------------------------------------------------

function phaseBadge(phase) {
  const known = PHASES.has(phase) ? phase : "Unknown";
  return el("span", { className: `badge phase-${known}` }, phase || "Unknown");
}

function slaCell(entry) {
  const sla = (entry.conditions || []).find((c) => c.type === "SLAMet");
  if (entry.slaMet === true) return el("span", { className: "badge ok" }, "met");
  if (entry.slaMet === false) return el("span", { className: "badge bad", title: sla && sla.message }, "breached");
  return el("span", { className: "muted" }, "no objectives");
}

function conditionChips(conditions) {
  return el(
    "ul",
    { className: "conditions" },
    ...(conditions || []).map((c) => {
      const status = STATUSES.has(c.status) ? c.status : "Unknown";
      const title = [c.reason, c.message].filter(Boolean).join(": ");
      const reason = status === "True" ? null : el("span", { className: "reason" }, ` ${c.reason}`);
      return el("li", { className: `condition status-${status}`, title, data: { type: c.type } }, c.type, reason);
    }),
  );
}

function productRow(entry) {
  const product = `${entry.namespace}/${entry.name}`;
  const open = el("button", { className: "link", data: { product } }, product);
  open.addEventListener("click", () => showProduct(product));
  return el(
    "tr",
    { data: { product } },
    el("td", null, open),
    el("td", null, entry.domain),
    el("td", null, entry.owner || "–"),
    el("td", { className: "phase" }, phaseBadge(entry.phase)),
    el("td", { className: "number" }, entry.records === undefined ? "–" : entry.records),
    el("td", { className: "sla" }, slaCell(entry)),
    el("td", null, conditionChips(entry.conditions)),
  );
}

async function loadProducts() {
  busy("products", true);
  say("catalog-status", "Loading…");
  try {
    const list = await api("/v1/products");
    fill(byId("products").tBodies[0], list.products.map(productRow));
    byId("product-count").textContent = `(${list.count})`;
    say("catalog-status", list.count ? "" : "No product is visible to you.");
  } catch (error) {
    fill(byId("products").tBodies[0], []);
    byId("product-count").textContent = "";
    say("catalog-status", `The catalog could not be loaded: ${error.message}`, true);
  } finally {
    busy("products", false);
  }
}

// ---- one product: schema and sample rows ----------------------------------------------------------

function schemaRow(field) {
  return el(
    "tr",
    { data: { field: field.name } },
    el("td", { className: "mono" }, field.name),
    el("td", null, field.type),
    el("td", null, field.primaryKey ? "primary key" : ""),
    el("td", null, field.pii ? "PII" : ""),
    el("td", null, field.description || ""),
  );
}

function sampleCell(row, field) {
  if ((row.masked || []).includes(field)) return el("td", { className: "masked", data: { field } }, "masked");
  return el("td", { data: { field } }, valueText((row.fields || {})[field]));
}

function showSample(entry, sample) {
  const fields = entry.fields.length ? entry.fields.map((f) => f.name) : Object.keys(sample.rows[0]?.fields || {});
  const table = byId("sample");
  fill(table.tHead, [el("tr", null, ...fields.map((f) => el("th", { className: "mono" }, f)))]);
  fill(
    table.tBodies[0],
    sample.rows.map((row) => el("tr", { data: { key: keyText(row.key) } }, ...fields.map((f) => sampleCell(row, f)))),
  );
  say("sample-status", sample.rows.length ? "" : "No rows yet.");
}

async function showProduct(product) {
  busy("product", true);
  try {
    await loadProduct(product);
  } finally {
    busy("product", false);
  }
}

async function loadProduct(product) {
  const section = byId("product");
  section.hidden = false;
  byId("product-title").textContent = product;
  fill(byId("schema").tBodies[0], []);
  fill(byId("sample").tHead, []);
  fill(byId("sample").tBodies[0], []);
  say("sample-status", "Loading…");
  let entry;
  try {
    entry = await api(productPath(product));
  } catch (error) {
    byId("product-description").textContent = "";
    say("sample-status", `The product could not be loaded: ${error.message}`, true);
    return;
  }
  byId("product-description").textContent = entry.description;
  byId("product-tags").textContent = (entry.tags || []).length ? `tags: ${entry.tags.join(", ")}` : "";
  fill(byId("schema").tBodies[0], (entry.fields || []).map(schemaRow));
  section.scrollIntoView({ block: "start" });
  if (!entry.collection) {
    say("sample-status", `No rows to show: the product has no search collection (phase ${entry.phase || "unknown"}).`);
    return;
  }
  try {
    showSample(entry, await api(`${productPath(product)}/sample?limit=${SAMPLE_ROWS}`));
  } catch (error) {
    say("sample-status", `Sample rows could not be loaded: ${error.message}`, true);
  }
}

// ---- a question -----------------------------------------------------------------------------------

function routingRow(route, index) {
  const flags = [route.requested ? "requested" : null, route.degraded ? "degraded" : null].filter(Boolean);
  return el(
    "tr",
    { data: { product: route.product } },
    el("td", { className: "number" }, index + 1),
    el("td", null, route.product, flags.length ? el("span", { className: "flag" }, ` ${flags.join(", ")}`) : null),
    el("td", { className: "number" }, number(route.score, 3)),
    el("td", { className: "why" }, route.why),
  );
}

function mergedRow(hit, index) {
  return el(
    "tr",
    { data: { product: hit.product, key: keyText(hit.key) } },
    el("td", { className: "number" }, index + 1),
    el("td", null, hit.product),
    el("td", { className: "mono key" }, keyText(hit.key)),
    el("td", { className: "number" }, number(hit.score, 3)),
  );
}

function hitRow(hit) {
  const masked = (hit.masked || []).length ? el("div", { className: "muted" }, `masked: ${hit.masked.join(", ")}`) : null;
  return el(
    "tr",
    { data: { key: keyText(hit.key) } },
    el("td", { className: "mono key" }, keyText(hit.key)),
    el("td", { className: "number" }, number(hit.similarity, 3)),
    el("td", null, hit.text || "", masked),
  );
}

function resultBlock(result) {
  const head = el("tr", null, el("th", null, "row key"), el("th", null, "similarity"), el("th", null, "text"));
  return el(
    "div",
    { className: "result", data: { product: result.product } },
    el("h4", null, result.product, el("span", { className: "muted" }, ` ${number(result.latencyMs, 1)} ms`)),
    el("table", { className: "hits" }, el("thead", null, head), el("tbody", null, ...result.hits.map(hitRow))),
  );
}

function showAnswer(answer) {
  const note = byId("low-confidence");
  note.hidden = !answer.lowConfidence;
  note.textContent = answer.lowConfidence ? `Low confidence: ${answer.confidenceNote || "no product clearly answers"}` : "";
  const message = byId("answer-message");
  message.hidden = !answer.message;
  message.textContent = answer.message || "";
  fill(byId("routing").tBodies[0], answer.routedTo.map(routingRow));
  fill(byId("merged").tBodies[0], answer.merged.map(mergedRow));
  fill(byId("results"), answer.results.map(resultBlock));
  const errors = answer.errors.map((e) => el("li", null, `${e.product}: ${e.error} (${e.kind})`));
  fill(byId("errors"), errors.length ? [el("h4", null, "Errors"), el("ul", { className: "errors" }, ...errors)] : []);
  byId("answer").hidden = false;
}

async function ask(event) {
  event.preventDefault();
  const question = byId("question").value.trim();
  if (!question) return;
  const button = event.target.querySelector("button");
  button.disabled = true;
  busy("ask", true);
  say("answer-status", "Asking…");
  try {
    const answer = await api("/v1/query", { body: { question, limit: 10, perProduct: 5 } });
    showAnswer(answer);
    say("answer-status", `Answered in ${number(answer.latencyMs, 0)} ms.`);
  } catch (error) {
    byId("answer").hidden = true;
    say("answer-status", `No answer: ${error.message}`, true);
  } finally {
    button.disabled = false;
    busy("ask", false);
  }
}

// ---- the visitor's token --------------------------------------------------------------------------

function showCaller() {
  byId("caller").textContent = token() ? "calling with your token" : "calling anonymously";
}

function reset() {
  byId("product").hidden = true;
  byId("answer").hidden = true;
  say("answer-status", "");
  showCaller();
  return loadProducts();
}

function useToken(event) {
  event.preventDefault();
  const value = byId("token").value.trim();
  if (value) sessionStorage.setItem(TOKEN_KEY, value);
  else sessionStorage.removeItem(TOKEN_KEY);
  byId("token").value = "";
  reset();
}

function forgetToken() {
  sessionStorage.removeItem(TOKEN_KEY);
  byId("token").value = "";
  reset();
}

document.addEventListener("DOMContentLoaded", () => {
  byId("token-form").addEventListener("submit", useToken);
  byId("token-clear").addEventListener("click", forgetToken);
  byId("question-form").addEventListener("submit", ask);
  reset();
});
