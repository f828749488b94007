// CrossLogic developer dashboard: a page over the admin API (/admin/v1), signed in with an admin token that is
// kept in sessionStorage (this tab only). Everything shown comes from the API; text is set with textContent only.
"use strict";

const API = "/admin/v1";
const $ = (id) => document.getElementById(id);
let token = sessionStorage.getItem("crosslogic-token") || "";
let orgId = null;
let chart = null;

async function api(method, path, body) {
  const response = await fetch(API + path, {
    method,
    headers: { authorization: "Bearer " + token, ...(body ? { "content-type": "application/json" } : {}) },
    body: body ? JSON.stringify(body) : undefined,
  });
  const payload = await response.json();
  if (!response.ok) {
    const error = new Error(payload.error ? payload.error.message : response.statusText);
    error.status = response.status;
    throw error;
  }
  return payload;
}

const usd = (micro) => "$" + (micro / 1e6).toFixed(micro && micro < 10000 ? 6 : 2);
const num = (n) => (n === null || n === undefined ? "–" : Number(n).toLocaleString("en-US"));
const when = (iso) => (iso ? iso.replace("T", " ").slice(0, 16) + " UTC" : "–");

function cell(row, text, className) {
  const td = document.createElement("td");
  td.textContent = text;
  if (className) td.className = className;
  row.appendChild(td);
  return td;
}

function fillTable(id, rows, columns) {
  const body = $(id).querySelector("tbody");
  body.replaceChildren();
  for (const r of rows) {
    const tr = document.createElement("tr");
    for (const c of columns) cell(tr, c(r));
    body.appendChild(tr);
  }
}

async function signIn(event) {
  if (event) event.preventDefault();
  token = token || $("token").value.trim();
  if (!token) token = $("token").value.trim();
  try {
    const me = await api("GET", "/me");
    sessionStorage.setItem("crosslogic-token", token);
    $("sign-in-error").textContent = "";
    if (me.org) {
      orgId = me.org.org_id;
      $("org-name").textContent = me.org.name + " · " + me.token.role;
    } else {
      const orgs = (await api("GET", "/orgs")).data;
      const picker = $("org-picker");
      picker.replaceChildren(...orgs.map((o) => new Option(o.name, o.org_id)));
      picker.hidden = false;
      orgId = orgs.length ? orgs[0].org_id : null;
      $("org-name").textContent = "platform · " + me.token.role;
    }
    $("sign-in-panel").hidden = true;
    $("dashboard").hidden = false;
    $("sign-out").hidden = false;
    $("create-key").hidden = !me.may.includes("keys");
    await loadAll();
  } catch (err) {
    token = "";
    sessionStorage.removeItem("crosslogic-token");
    $("sign-in-error").textContent = "Sign-in failed: " + err.message;
    document.body.dataset.state = "signed-out";
  }
}

function signOut() {
  token = "";
  sessionStorage.removeItem("crosslogic-token");
  location.reload();
}

async function loadAll() {
  document.body.dataset.state = "loading";
  await Promise.all([loadBilling(), loadUsage(), loadKeys(), loadLimits()]);
  document.body.dataset.state = "ready";
}

async function loadBilling() {
  const b = await api("GET", `/orgs/${orgId}/billing`);
  $("month-tokens").textContent = num(b.tokens);
  $("month-cost").textContent = usd(b.cost_microdollars);
  $("owed").textContent = "owed after free tier: " + usd(b.owed_microdollars);
  $("test-usage").textContent = b.test_usage.requests
    ? ` · test keys: ${num(b.test_usage.tokens)} tokens, free` : "";
  const free = b.free_tier;
  $("free-remaining").textContent = free.unlimited ? "unlimited" : num(free.remaining_tokens);
  $("free-of").textContent = free.unlimited ? "reserved plan" : `of ${num(free.allowance_tokens)} tokens`;
  $("reserved").textContent = b.reserved_tokens_per_sec
    ? `${num(b.reserved_tokens_per_sec)} tok/s` : b.billing_plan;
  $("bill-cap").textContent = b.reserved_tokens_per_sec ? "plan " + b.billing_plan + " (reserved CU)"
    : (b.bill_cap_microdollars === null ? "no monthly cap" : "cap " + usd(b.bill_cap_microdollars));
}

function sumBy(rows) {
  const out = new Map();
  for (const r of rows) {
    const t = out.get(r.group) || { group: r.group, requests: 0, total_tokens: 0, cost_microdollars: 0 };
    t.requests += r.requests; t.total_tokens += r.total_tokens; t.cost_microdollars += r.cost_microdollars;
    out.set(r.group, t);
  }
  return [...out.values()].sort((a, b) => b.total_tokens - a.total_tokens);
}

async function loadUsage() {
  const bucket = $("bucket").value;
  const step = bucket === "hour" ? 3600 : 86400;
  const count = bucket === "hour" ? 24 : 30;
  const until = new Date(Math.ceil(Date.now() / 1000 / step) * step * 1000);
  const since = new Date(until.getTime() - count * step * 1000);
  const q = `bucket=${bucket}&since=${since.toISOString()}&until=${until.toISOString()}`;
  const [series, models, regions] = await Promise.all([
    api("GET", `/orgs/${orgId}/usage?${q}`),
    api("GET", `/orgs/${orgId}/usage?${q}&group_by=model`),
    api("GET", `/orgs/${orgId}/usage?${q}&group_by=region`),
  ]);
  const byTime = new Map(series.data.map((r) => [Date.parse(r.bucket) / 1000, r]));
  const xs = [], prompt = [], completion = [];
  for (let t = since.getTime() / 1000; t < until.getTime() / 1000; t += step) {
    const r = byTime.get(t);
    xs.push(t); prompt.push(r ? r.prompt_tokens : 0); completion.push(r ? r.completion_tokens : 0);
  }
  drawChart(xs, prompt, completion);
  $("usage-empty").hidden = series.data.length > 0;
  $("usage-chart").dataset.points = String(series.data.length);
  $("usage-chart").dataset.totalTokens = String(series.data.reduce((s, r) => s + r.total_tokens, 0));
  const columns = [(r) => r.group, (r) => num(r.requests), (r) => num(r.total_tokens), (r) => usd(r.cost_microdollars)];
  fillTable("by-model", sumBy(models.data), columns);
  fillTable("by-region", sumBy(regions.data), columns);
}

function drawChart(xs, prompt, completion) {
  const el = $("usage-chart");
  const width = Math.max(400, el.clientWidth || 900);
  const bars = uPlot.paths.bars({ size: [0.7, 60] });
  const opts = {
    width, height: 260,
    scales: { x: { time: true } },
    // Stacked by drawing the total first and the prompt part over it: the green above the blue is completion.
    series: [{}, { label: "completion tokens (stacked on prompt)", stroke: "#20bf6b", fill: "rgba(32,191,107,0.45)",
      paths: bars, value: (u, v, si, i) => (i === null ? "--" : num(completion[i])) },
    { label: "prompt tokens", stroke: "#3867d6", fill: "rgba(56,103,214,0.55)", paths: bars }],
    axes: [{}, { size: 70 }],
  };
  if (chart) chart.destroy();
  const total = prompt.map((p, i) => p + completion[i]);
  chart = new uPlot(opts, [xs, total, prompt], el);
}

async function loadKeys() {
  const [keys, envs] = await Promise.all([api("GET", `/orgs/${orgId}/keys`), api("GET", `/orgs/${orgId}/environments`)]);
  $("new-key-env").replaceChildren(...envs.data.map((e) => new Option(e.name, e.env_id)));
  const body = $("keys").querySelector("tbody");
  body.replaceChildren();
  const canManage = !$("create-key").hidden;
  for (const k of keys.data) {
    const tr = document.createElement("tr");
    tr.dataset.keyId = k.key_id;
    cell(tr, k.key_prefix + "…");
    const badge = document.createElement("span");
    badge.textContent = k.mode;
    badge.className = "badge mode-" + k.mode;
    cell(tr, "", "mode").appendChild(badge);
    cell(tr, k.name || "–");
    cell(tr, k.env_name);
    cell(tr, k.status, "status-" + k.status);
    cell(tr, when(k.expires_at));
    cell(tr, when(k.created_at));
    const actions = cell(tr, "");
    if (canManage && k.status === "active") {
      for (const [label, action] of [["Rotate", rotateKey], ["Revoke", revokeKey]]) {
        const button = document.createElement("button");
        button.textContent = label;
        button.className = label.toLowerCase();
        button.dataset.keyId = k.key_id;
        button.addEventListener("click", () => action(k));
        actions.appendChild(button);
      }
    }
    body.appendChild(tr);
  }
}

function showNewKey(plaintext) {
  $("new-key-value").textContent = plaintext;
  $("new-key").hidden = false;
}

async function guarded(work) {
  $("keys-error").textContent = "";
  try {
    await work();
  } catch (err) {
    $("keys-error").textContent = err.message;
  }
}

async function createKey(event) {
  event.preventDefault();
  await guarded(async () => {
    const created = await api("POST", `/orgs/${orgId}/keys`,
      { env: $("new-key-env").value, name: $("new-key-name").value.trim(),
        mode: $("new-key-test").checked ? "test" : "live" });
    showNewKey(created.api_key);
    await loadKeys();
  });
}

async function revokeKey(k) {
  if (!confirm(`Revoke ${k.key_prefix}…? Requests with it are refused from now on.`)) return;
  await guarded(async () => {
    await api("POST", `/orgs/${orgId}/keys/${k.key_id}/revoke`);
    await loadKeys();
  });
}

async function rotateKey(k) {
  const overlap = prompt("Keep the old key working for how many seconds (0 = revoke it now)?", "3600");
  if (overlap === null) return;
  await guarded(async () => {
    const rotated = await api("POST", `/orgs/${orgId}/keys/${k.key_id}/rotate`,
      { overlap_seconds: parseInt(overlap, 10) || 0 });
    showNewKey(rotated.api_key);
    await loadKeys();
  });
}

async function loadLimits() {
  const [limits, caps] = await Promise.all([api("GET", `/orgs/${orgId}/limits`), api("GET", "/test-key-limits")]);
  $("test-key-caps").textContent = "Test keys: at most " + [["tokens_per_min", "tokens/min"],
    ["requests_per_min", "requests/min"], ["concurrency", "concurrent requests"],
    ["max_tokens_per_request", "max tokens per request"]]
    .filter(([k]) => caps[k] !== null).map(([k, label]) => `${num(caps[k])} ${label}`).join(", ") + " each.";
  const rows = [];
  for (const layer of limits.layers) {
    for (const l of layer.limits) rows.push([layer.layer, l.kind, l.value === null ? "unlimited" : num(l.value), l.source]);
  }
  for (const q of limits.quotas) rows.push([q.level, q.kind, q.value === null ? "–" : num(q.value), q.source]);
  fillTable("limits", rows, [(r) => r[0], (r) => r[1], (r) => r[2], (r) => r[3]]);
}

$("sign-in").addEventListener("submit", (e) => { token = ""; signIn(e); });
$("sign-out").addEventListener("click", signOut);
$("create-key").addEventListener("submit", createKey);
$("bucket").addEventListener("change", () => loadUsage());
$("refresh").addEventListener("click", () => loadAll());
$("org-picker").addEventListener("change", (e) => { orgId = e.target.value; loadAll(); });
if (token) signIn();
