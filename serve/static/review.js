// The review page: reads GET /v1/admin/review and posts labels to POST /v1/admin/review/labels with
// the admin token (kept in this tab's sessionStorage only). Customer texts are set as text, never as HTML.
"use strict";

const TOKEN_KEY = "supportbot.admin_token";
const PAGE = 50;
const NEW = "__new__";
const OOS = "__oos__";
let offset = 0;
let current = null;

const $ = (id) => document.getElementById(id);

function token() { return sessionStorage.getItem(TOKEN_KEY) || ""; }

function showError(message) {
  $("error").textContent = message;
  $("error").hidden = !message;
}

async function call(path, options = {}) {
  const response = await fetch(path, {
    ...options,
    headers: { "Authorization": `Bearer ${token()}`, "Content-Type": "application/json", ...(options.headers || {}) },
  });
  let body = null;
  try { body = await response.json(); } catch (_) { body = null; }
  if (!response.ok) {
    const message = body && body.error ? body.error.message : `the server answered ${response.status}`;
    if (response.status === 401) sessionStorage.removeItem(TOKEN_KEY);
    throw new Error(message);
  }
  return body;
}

function fillTargets(intents) {
  const select = $("target");
  const chosen = select.value;
  select.replaceChildren();
  for (const name of intents) select.append(new Option(name, name));
  select.append(new Option("New intent…", NEW));
  select.append(new Option("Out of scope", OOS));
  if ([...select.options].some((o) => o.value === chosen)) select.value = chosen;
  $("new-name-box").hidden = select.value !== NEW;
}

function render(data) {
  current = data;
  $("summary").textContent = `${data.total} messages in ${data.groups} groups (model ${data.model_version}); ` +
    `showing ${data.total ? data.offset + 1 : 0}–${data.offset + data.items.length}.`;
  fillTargets(data.intents);
  const body = $("items");
  body.replaceChildren();
  let group = null;
  for (const item of data.items) {
    if (item.group !== group) {
      group = item.group;
      const head = document.createElement("tr");
      head.className = "group-head";
      const cell = document.createElement("th");
      cell.colSpan = 6;
      cell.scope = "rowgroup";
      cell.textContent = `Group ${item.group + 1} · ${item.group_size} message${item.group_size === 1 ? "" : "s"}`;
      head.append(cell);
      body.append(head);
    }
    const row = document.createElement("tr");
    const pick = document.createElement("td");
    const radio = document.createElement("input");
    radio.type = "radio";
    radio.name = "item";
    radio.value = String(item.id);
    radio.setAttribute("aria-label", item.text);
    pick.append(radio);
    const cells = [item.text, item.reason.replace("_", " "), item.predicted || "", item.margin.toFixed(2),
      item.at.replace("T", " ").slice(0, 16)];
    row.append(pick);
    for (const [i, value] of cells.entries()) {
      const cell = document.createElement("td");
      cell.textContent = value;
      if (i === 3) cell.className = "num";
      row.append(cell);
    }
    body.append(row);
  }
  $("previous").disabled = data.offset === 0;
  $("next").disabled = data.offset + data.items.length >= data.total;
  $("queue").hidden = false;
  $("login").hidden = true;
}

async function load() {
  showError("");
  try {
    const order = encodeURIComponent($("order").value);
    let data = await call(`/v1/admin/review?offset=${offset}&limit=${PAGE}&order=${order}`);
    if (!data.items.length && offset > 0) {  // the last page emptied by labelling: step back
      offset = Math.max(0, offset - PAGE);
      data = await call(`/v1/admin/review?offset=${offset}&limit=${PAGE}&order=${order}`);
    }
    render(data);
  } catch (error) {
    showError(error.message);
    if (!token()) { $("login").hidden = false; $("queue").hidden = true; }
  }
}

async function label(wholeGroup) {
  showError("");
  const picked = document.querySelector('input[name="item"]:checked');
  if (!picked) { showError("Pick a message first."); return; }
  const value = $("target").value;
  const body = { ids: [Number(picked.value)], whole_group: wholeGroup };
  if (value === OOS) body.target = "out_of_scope";
  else if (value === NEW) { body.target = "new_intent"; body.intent = $("new-name").value.trim(); }
  else { body.target = "intent"; body.intent = value; }
  try {
    const result = await call("/v1/admin/review/labels", { method: "POST", body: JSON.stringify(body) });
    const what = result.label === "oos" ? "out of scope" : result.label;
    $("status").textContent = `Labelled ${result.labelled} message${result.labelled === 1 ? "" : "s"} as ${what}` +
      (result.already_labelled ? ` (${result.already_labelled} labelled before)` : "") + ".";
    if (value === NEW) $("new-name").value = "";
    await load();
  } catch (error) {
    showError(error.message);
  }
}

document.addEventListener("DOMContentLoaded", () => {
  $("login").addEventListener("submit", (event) => {
    event.preventDefault();
    sessionStorage.setItem(TOKEN_KEY, $("token").value);
    $("token").value = "";
    load();
  });
  $("target").addEventListener("change", () => { $("new-name-box").hidden = $("target").value !== NEW; });
  $("label-one").addEventListener("click", () => label(false));
  $("label-group").addEventListener("click", () => label(true));
  $("order").addEventListener("change", () => { offset = 0; load(); });
  $("previous").addEventListener("click", () => { offset = Math.max(0, offset - PAGE); load(); });
  $("next").addEventListener("click", () => { offset += PAGE; load(); });
  if (token()) { $("login").hidden = true; load(); }
});
