// corral console: vanilla JavaScript, no build step. Every value from the API is put into
// the page with textContent (never innerHTML): connector output and logs are hostile.
"use strict";

const TOKEN_KEY = "corral.token";
const $ = (id) => document.getElementById(id);

// -- helpers --------------------------------------------------------------------------------

/** An element with attributes and children (strings become text nodes). */
function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (name === "text") node.textContent = String(value);
    else if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
    else node.setAttribute(name, value === true ? "" : String(value));
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

function clear(node) {
  node.replaceChildren();
  return node;
}

function announce(message) {
  $("announce").textContent = message;
}

function when(ts) {
  if (ts === null || ts === undefined) return "—";
  const date = new Date(ts * 1000);
  const pad = (n) => String(n).padStart(2, "0");
  return `${date.getFullYear()}-${pad(date.getMonth() + 1)}-${pad(date.getDate())} ` +
    `${pad(date.getHours())}:${pad(date.getMinutes())}:${pad(date.getSeconds())}`;
}

function ago(ts) {
  if (ts === null || ts === undefined) return "—";
  const seconds = Math.max(0, Date.now() / 1000 - ts);
  if (seconds < 90) return `${seconds.toFixed(1)} s ago`;
  if (seconds < 5400) return `${Math.round(seconds / 60)} min ago`;
  return `${(seconds / 3600).toFixed(1)} h ago`;
}

function ms(value) {
  if (value === null || value === undefined) return "—";
  return value >= 1000 ? `${(value / 1000).toFixed(2)} s` : `${Number(value).toFixed(1)} ms`;
}

function megabytes(bytes) {
  if (bytes === null || bytes === undefined) return "—";
  return `${(bytes / (1024 * 1024)).toFixed(1)} MB`;
}

function pretty(value) {
  try {
    return JSON.stringify(value, null, 2);
  } catch (error) {
    return String(value);
  }
}

/** A status as a badge: its word, plus colour. */
function badge(status, label) {
  const word = String(status ?? "unknown");
  return el("span", { class: `badge s-${word.replace(/[^a-z_]/g, "")}`, text: label ?? word });
}

function facts(pairs) {
  return pairs.map(([term, value]) =>
    el("div", { "data-fact": term }, el("dt", { text: term }), el("dd", {}, value instanceof Node ? value : String(value ?? "—"))));
}

// -- the API ---------------------------------------------------------------------------------

class Unauthorized extends Error {}

function headers(extra) {
  const token = sessionStorage.getItem(TOKEN_KEY);
  const all = { ...(extra || {}) };
  if (token) all.authorization = `Bearer ${token}`;
  return all;
}

/** fetch() an endpoint with the token; the parsed JSON, or an Error with the API's message. */
async function api(path, options = {}) {
  const { answers503, json, ...rest } = options;
  const init = { ...rest, headers: headers(options.headers) };
  if (json !== undefined) {
    init.method = init.method || "POST";
    init.body = JSON.stringify(json);
    init.headers["content-type"] = "application/json";
  }
  const response = await fetch(path, init);
  if (response.status === 401) {
    showLogin(sessionStorage.getItem(TOKEN_KEY) ? "The stored token was refused; give it again." : "");
    throw new Unauthorized("unauthorized");
  }
  const type = response.headers.get("content-type") || "";
  const body = type.includes("json") ? await response.json() : await response.text();
  if (!response.ok && !(response.status === 503 && answers503)) {
    const detail = body && body.error ? `${body.error.type}: ${body.error.message}` : `HTTP ${response.status}`;
    const error = new Error(detail);
    error.status = response.status;
    throw error;
  }
  return body;
}

function failed(where, error) {
  if (error instanceof Unauthorized) return;
  clear(where).append(el("p", { class: "error-text", role: "alert", text: `Could not load: ${error.message}` }));
}

// -- sandbox kills explained -------------------------------------------------------------------

/** What happened and which limit to raise, in words, for a sandbox kill; null otherwise. */
function explain(error, where) {
  if (!error) return null;
  const playground = where === "playground";
  const texts = {
    memory_limit: [
      "The sandbox went past its memory limit and the kernel's OOM killer stopped it.",
      playground
        ? "Raise the Memory (MB) limit above (max_memory_mb), or the deployment default SANDBOX_MAX_MEMORY_MB; or make the code hold less."
        : "Raise SANDBOX_MAX_MEMORY_MB for the processes that run workflows (the worker, or the API's inline worker), or make the connector hold less.",
    ],
    cpu_limit: [
      "The execution used more CPU time than its limit allows and was killed.",
      playground
        ? "Raise the CPU time (ms) limit above (max_cpu_ms), or the deployment default SANDBOX_MAX_CPU_MS."
        : "Raise SANDBOX_MAX_CPU_MS for the processes that run workflows, or make the connector do less work.",
    ],
    timeout: [
      "The execution ran past its wall-clock time-out and was stopped.",
      playground
        ? "Raise the Time-out (ms) above (timeout_ms; default 15 s)."
        : "Raise the node's timeout_ms in the workflow definition (default 15 s), or find what the connector waits on.",
    ],
    heartbeat_timeout: [
      "The sandbox went silent: no heartbeat came within the heartbeat time-out, so it was presumed hung and killed (for example a regular expression backtracking in C code).",
      "If the code legitimately blocks that long, raise SANDBOX_HEARTBEAT_TIMEOUT_MS (heartbeat_timeout_ms, at least twice SANDBOX_HEARTBEAT_INTERVAL_MS); otherwise fix the code.",
    ],
  };
  const found = texts[error.type];
  if (!found) return null;
  return el("div", { class: "explain", role: "note" },
    el("p", {}, el("strong", { text: `Why it stopped (${error.type}): ` }), found[0]),
    el("p", {}, el("strong", { text: "What to raise: " }), found[1]));
}

function errorBlock(error, where) {
  if (!error) return null;
  return el("div", { class: "error-block" },
    el("p", {}, el("strong", { text: "Error: " }), el("span", { class: "mono", text: error.type || "error" }),
      " — ", String(error.message ?? "")),
    explain(error, where));
}

// -- sign-in ---------------------------------------------------------------------------------

function showLogin(message) {
  signedIn = false;
  showView("login");
  const error = $("login-error");
  error.hidden = !message;
  error.textContent = message || "";
  $("forget").hidden = true;
  $("login-token").focus();
}

async function login(event) {
  event.preventDefault();
  const token = $("login-token").value.trim();
  if (!token) return;
  const response = await fetch("/api/runs?limit=1", { headers: { authorization: `Bearer ${token}` } });
  if (response.status === 401) {
    const error = $("login-error");
    error.hidden = false;
    error.textContent = "That token was refused (401 unauthorized). Check CORRAL_API_TOKEN.";
    $("login-token").select();
    return;
  }
  sessionStorage.setItem(TOKEN_KEY, token);
  $("login-token").value = "";
  $("forget").hidden = false;
  if (!location.hash || location.hash === "#/login") location.hash = "#/runs";
  else route();
}

// -- routing ---------------------------------------------------------------------------------

let leave = null; // what the current view does when it is left (stop a stream)
let signedIn = false; // whether the API has answered this tab (with its token, if it wants one)

function showView(name) {
  for (const view of document.querySelectorAll(".view")) view.hidden = view.id !== `view-${name}`;
  for (const link of document.querySelectorAll("[data-nav]")) {
    const current = link.dataset.nav === name || (name === "run" && link.dataset.nav === "runs");
    if (current) link.setAttribute("aria-current", "page");
    else link.removeAttribute("aria-current");
  }
}

async function route() {
  if (leave) {
    leave();
    leave = null;
  }
  const hash = location.hash || "#/runs";
  const [, name, ...rest] = hash.split("/");
  const views = { runs: showRuns, run: showRun, capabilities: showCapabilities, health: showHealth, playground: showPlayground };
  const show = views[name] || showRuns;
  const viewName = views[name] ? name : "runs";
  showView(viewName);
  const heading = document.querySelector(`#view-${viewName} h1`);
  if (heading && document.activeElement !== $("login-token")) heading.focus({ preventScroll: true });
  try {
    if (!signedIn) {
      await api("/api/runs?limit=1"); // the sign-in form when the API wants a token
      signedIn = true;
    }
    await show(rest.map(decodeURIComponent).join("/"));
  } catch (error) {
    if (!(error instanceof Unauthorized)) announce(`Error: ${error.message}`);
  }
}

// -- runs ------------------------------------------------------------------------------------

const runsPage = { cursors: [null], index: 0, next: null };

function runsQuery() {
  const form = $("runs-filter");
  const params = new URLSearchParams({ limit: form.limit.value });
  if (form.status.value) params.set("status", form.status.value);
  if (form.workflow.value.trim()) params.set("workflow", form.workflow.value.trim());
  if (form.since.value) params.set("since", String(Math.floor(Date.now() / 1000) - Number(form.since.value)));
  const cursor = runsPage.cursors[runsPage.index];
  if (cursor) params.set("cursor", cursor);
  return params;
}

async function showRuns() {
  await Promise.all([loadRuns(), loadWorkflows()]);
}

async function loadWorkflows() {
  const body = await api("/api/workflows");
  const ids = body.workflows.map((w) => w.id);
  clear($("workflow-ids")).append(...ids.map((id) => el("option", { value: id })));
  const select = $("start-workflow");
  const chosen = select.value;
  clear(select).append(...ids.map((id) => el("option", { value: id, text: id })));
  if (ids.includes(chosen)) select.value = chosen;
}

let runsAsked = 0; // the latest loadRuns; an older one's late reply is dropped

async function loadRuns() {
  const tbody = $("runs-table").querySelector("tbody");
  const asked = ++runsAsked;
  let body;
  try {
    body = await api(`/api/runs?${runsQuery()}`);
  } catch (error) {
    if (asked === runsAsked) failed($("bulk-result"), error);
    return;
  }
  if (asked !== runsAsked) return; // a newer filter or page was asked for meanwhile
  runsPage.next = body.next_cursor;
  $("select-all").checked = false;
  clear(tbody).append(...body.runs.map((run) => el("tr", {},
    el("td", {}, el("input", { type: "checkbox", class: "pick", value: run.id, "aria-label": `Select run ${run.id}` })),
    el("td", { class: "mono" }, el("a", { href: `#/run/${encodeURIComponent(run.id)}`, text: run.id })),
    el("td", { text: run.workflow }),
    el("td", {}, badge(run.status)),
    el("td", { class: "num", text: when(run.created_at) }),
    el("td", { class: "num", text: run.duration_s === null ? "—" : `${run.duration_s.toFixed(2)} s` }),
    el("td", { class: "mono", text: run.error_type || "—" }))));
  $("runs-empty").hidden = body.runs.length > 0;
  $("page-newer").disabled = runsPage.index === 0;
  $("page-older").disabled = !runsPage.next;
  $("page-number").textContent = `Page ${runsPage.index + 1}`;
}

async function bulk(action) {
  const picked = [...document.querySelectorAll("#runs-table .pick:checked")].map((box) => box.value);
  const result = $("bulk-result");
  if (!picked.length) {
    result.textContent = "Select runs first (the checkboxes in the first column).";
    return;
  }
  result.textContent = `${action === "retry" ? "Retrying" : "Cancelling"} ${picked.length} run(s)…`;
  const outcomes = await Promise.all(picked.map(async (id) => {
    try {
      const body = await api(`/api/runs/${encodeURIComponent(id)}/${action}`, { method: "POST" });
      return `${id}: ${body.status}`;
    } catch (error) {
      return `${id}: ${error.message}`;
    }
  }));
  result.textContent = outcomes.join("; ");
  await loadRuns();
}

async function startRun(event) {
  event.preventDefault();
  const form = $("start-form");
  const error = $("start-error");
  error.hidden = true;
  let input;
  try {
    input = JSON.parse(form.input.value || "{}");
  } catch (problem) {
    error.hidden = false;
    error.textContent = `The input is not valid JSON: ${problem.message}`;
    return;
  }
  try {
    const body = await api(`/api/workflows/${encodeURIComponent(form.workflow.value)}/runs`, { json: { input } });
    location.hash = `#/run/${encodeURIComponent(body.run_id)}`;
  } catch (problem) {
    error.hidden = false;
    error.textContent = problem.message;
  }
}

// -- one run ----------------------------------------------------------------------------------

const FINISHED = new Set(["succeeded", "failed", "cancelled"]);

/** Node ids in dependency order (definition order among equals); dependsOn of each. */
function ordered(definition, nodes) {
  const declared = (definition && Array.isArray(definition.nodes)) ? definition.nodes : [];
  const depends = new Map(declared.map((n) => [String(n.id), (n.dependsOn || []).map(String)]));
  for (const id of Object.keys(nodes)) if (!depends.has(id)) depends.set(id, []);
  const order = [];
  const placed = new Set();
  while (order.length < depends.size) {
    const ready = [...depends.keys()].filter((id) => !placed.has(id) && depends.get(id).every((d) => placed.has(d) || !depends.has(d)));
    const next = ready.length ? ready : [...depends.keys()].filter((id) => !placed.has(id)); // a cycle: as declared
    for (const id of next) {
      order.push(id);
      placed.add(id);
    }
  }
  return order.map((id) => [id, depends.get(id)]);
}

function renderNode(id, dependsOn, node, live) {
  const status = live || (node ? node.status : "pending");
  const meta = (node && node.metadata) || {};
  const usage = node && node.usage;
  const executor = meta.executor ? `${meta.executor}${meta.executor === "generic" ? " (fallback)" : ""}` : "—";
  const logs = (node && node.logs) || [];
  return el("article", { class: `card node s-border-${status}`, "aria-labelledby": `node-${id}` },
    el("div", { class: "node-head" },
      el("h3", { id: `node-${id}`, class: "mono", text: id }),
      badge(status),
      el("span", { class: "note", text: dependsOn.length ? `depends on ${dependsOn.join(", ")}` : "no dependencies" })),
    el("dl", { class: "facts" }, facts([
      ["Executor", executor],
      ["Fallback reason", meta.fallback_reason || "—"],
      ["Attempts", meta.attempts ?? "—"],
      ["Replayed", meta.replayed === undefined ? "—" : (meta.replayed ? "yes, replayed from the store" : "no")],
      ["Circuit", meta.circuit_state || "—"],
      ["Execution time", ms(meta.execution_ms)],
      ["CPU", usage ? ms(usage.cpu_ms) : "—"],
      ["Peak memory", usage ? megabytes(usage.peak_memory_bytes) : "—"],
    ])),
    node && node.error ? errorBlock(node.error, "run") : null,
    el("details", { "data-key": `${id}:logs` },
      el("summary", { text: `Logs (${logs.length} line${logs.length === 1 ? "" : "s"}, redacted)` }),
      el("pre", { class: "logs", tabindex: "0", text: logs.map((line) => `[${line.level}] ${line.message}`).join("\n") || "(no logs)" })),
    node && node.output !== undefined && node.output !== null
      ? el("details", { "data-key": `${id}:output` }, el("summary", { text: "Output" }), el("pre", { class: "output", tabindex: "0", text: pretty(node.output) }))
      : null);
}

function describeEvent(event) {
  const parts = event.event ? [event.event] : [];
  if (event.node) parts.push(`node ${event.node}`);
  if (typeof event.status === "number") parts.push(`HTTP ${event.status}`);
  else if (event.status) parts.push(`status ${event.status}`);
  if (event.attempt) parts.push(`attempt ${event.attempt}`);
  if (event.error_type) parts.push(`error ${event.error_type}`);
  if (event.error) parts.push(String(event.error));
  if (event.reason) parts.push(`reason: ${event.reason}`);
  if (event.from_state) parts.push(`${event.from_state} → ${event.to_state}`);
  if (event.delay_s !== undefined) parts.push(`in ${event.delay_s} s`);
  return parts.join(" · ") || "—";
}

/** Read /api/runs/ID/events with fetch (EventSource cannot send the token) and parse SSE. */
async function follow(runId, after, onEvent, signal) {
  const extra = after ? { "last-event-id": String(after) } : {};
  const response = await fetch(`/api/runs/${encodeURIComponent(runId)}/events`, { headers: headers(extra), signal });
  if (response.status === 401) throw new Unauthorized("unauthorized");
  if (!response.ok || !response.body) throw new Error(`the event stream answered HTTP ${response.status}`);
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += value.replace(/\r\n?/g, "\n");
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const fields = {};
      for (const line of block.split("\n")) {
        if (!line || line.startsWith(":")) continue;
        const colon = line.indexOf(":");
        const name = colon < 0 ? line : line.slice(0, colon);
        const text = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
        fields[name] = name === "data" && fields.data !== undefined ? `${fields.data}\n${text}` : text;
      }
      if (fields.data === undefined) continue;
      let data;
      try {
        data = JSON.parse(fields.data);
      } catch (error) {
        data = { event: fields.event || "message", text: fields.data };
      }
      onEvent(Number(fields.id) || 0, data);
    }
  }
}

async function showRun(runId) {
  const state = { runId, live: {}, lastSeq: 0, stopped: false, controller: null, definition: null, timer: null, status: null };
  leave = () => {
    state.stopped = true;
    if (state.controller) state.controller.abort();
    clearTimeout(state.timer);
  };
  $("run-title").textContent = `Run ${runId}`;
  clear($("run-facts"));
  clear($("run-nodes"));
  clear($("run-error"));
  clear($("run-events"));
  $("run-live").textContent = "";

  const render = (run) => {
    state.status = run.status;
    clear($("run-facts")).append(...facts([
      ["Status", badge(run.status)],
      ["Workflow", run.workflow],
      ["Created", when(run.created_at)],
      ["Started", when(run.started_at)],
      ["Finished", when(run.finished_at)],
      ["Attempts (run)", run.attempts],
    ]));
    clear($("run-error")).append(...[run.error ? errorBlock(run.error, "run") : null].filter(Boolean));
    const open = new Set([...$("run-nodes").querySelectorAll("details[open]")].map((d) => d.dataset.key));
    const focused = $("run-nodes").contains(document.activeElement) ? document.activeElement.closest("details") : null;
    const focusKey = focused ? focused.dataset.key : null; // keep a keyboard user's place
    const nodes = run.nodes || {};
    const going = !FINISHED.has(run.status);
    clear($("run-nodes")).append(...ordered(state.definition, nodes).map(([id, deps]) =>
      renderNode(id, deps, nodes[id], going ? state.live[id] : undefined)));
    for (const details of $("run-nodes").querySelectorAll("details")) details.open = open.has(details.dataset.key);
    if (focusKey) {
      const again = $("run-nodes").querySelector(`details[data-key="${CSS.escape(focusKey)}"] summary`);
      if (again) again.focus({ preventScroll: true });
    }
    $("run-retry").disabled = !(run.status === "failed" || run.status === "cancelled");
    $("run-cancel").disabled = !(run.status === "queued" || run.status === "running");
  };

  const refresh = async () => {
    const run = await api(`/api/runs/${encodeURIComponent(runId)}`);
    if (!state.stopped) render(run);
    return run;
  };
  const soon = () => {
    clearTimeout(state.timer);
    state.timer = setTimeout(() => refresh().catch(() => {}), 120);
  };

  const stream = async () => {
    state.streaming = true;
    try {
      await streamLoop();
    } finally {
      state.streaming = false;
    }
  };
  const streamLoop = async () => {
    while (!state.stopped) {
      state.controller = new AbortController();
      $("run-live").textContent = "Live: following the run's events…";
      try {
        await follow(runId, state.lastSeq, (seq, event) => {
          state.lastSeq = Math.max(state.lastSeq, seq);
          if (event.event === "run.started") state.live = {};
          if (event.event === "node.started" && event.node) state.live[event.node] = "running";
          if (event.event === "node.finished" && event.node) state.live[event.node] = event.status || "finished";
          $("run-events").append(el("li", {}, el("span", { class: "note", text: `${when(event.ts)} ` }), describeEvent(event)));
          soon();
        }, state.controller.signal);
      } catch (error) {
        if (state.stopped || error instanceof Unauthorized) return;
      }
      const run = await refresh();
      if (FINISHED.has(run.status)) {
        $("run-live").textContent = `Finished: ${run.status}. Not following.`;
        announce(`Run ${runId} ${run.status}`);
        return;
      }
      await new Promise((resolve) => setTimeout(resolve, 500));
    }
  };

  const run = await api(`/api/runs/${encodeURIComponent(runId)}`);
  try {
    const stored = await api(`/api/workflows/${encodeURIComponent(run.workflow)}`);
    state.definition = stored;
  } catch (error) {
    if (error instanceof Unauthorized) throw error;
    state.definition = null; // the workflow is gone: the nodes in the run's order
  }
  render(run);
  state.follow = stream;
  state.refresh = refresh;
  showRun.current = state;
  stream().catch(() => {});
}

async function runAction(action) {
  const state = showRun.current;
  if (!state || state.stopped) return;
  const live = $("run-live");
  try {
    const body = await api(`/api/runs/${encodeURIComponent(state.runId)}/${action}`, { method: "POST" });
    live.textContent = `${action === "retry" ? "Retried" : "Cancel asked"}: ${body.status}.`;
    announce(live.textContent);
    if (!state.streaming) state.follow();
    else await state.refresh();
  } catch (error) {
    if (!(error instanceof Unauthorized)) live.textContent = `Could not ${action}: ${error.message}`;
  }
}

// -- capabilities ------------------------------------------------------------------------------

const EXECUTOR_WORDS = { bespoke: "bespoke handler", generic: "generic executor", none: "none" };

async function showCapabilities() {
  const where = $("caps-apps");
  let body;
  try {
    body = await api("/api/console/coverage");
  } catch (error) {
    failed(where, error);
    return;
  }
  const uncovered = body.apps.flatMap((app) => app.operations.filter((op) => op.executor === "none"));
  clear($("caps-flag")).append(
    "GENERIC_EXECUTOR_ENABLED is ", el("strong", { text: body.generic_executor_enabled ? "on" : "off" }),
    " in this API process. ",
    uncovered.length
      ? el("span", { class: "warning", text: `Warning: ${uncovered.length} operation(s) have no runtime coverage.` })
      : "Every operation of the catalog has runtime coverage.");
  const only = $("caps-uncovered").checked;
  const apps = body.apps
    .map((app) => ({ ...app, operations: app.operations.filter((op) => !only || op.executor === "none") }))
    .filter((app) => app.operations.length);
  clear(where).append(...apps.map((app) => el("section", { class: "card", "aria-labelledby": `app-${app.id}` },
    el("h2", { id: `app-${app.id}` }, app.name, " ", el("span", { class: "note mono", text: `(${app.id})` })),
    el("table", { class: "caps" },
      el("caption", { class: "visually-hidden", text: `Operations of ${app.name}` }),
      el("colgroup", {}, ...["kind", "op", "runs", "fallback", "coverage"].map((name) => el("col", { class: name }))),
      el("thead", {}, el("tr", {}, ...["Kind", "Operation", "Runs with", "Fallback", "Coverage"].map((h) => el("th", { scope: "col", text: h })))),
      el("tbody", {}, ...app.operations.map((op) => el("tr", { "data-operation": `${app.id}.${op.id}` },
        el("td", { text: op.kind }),
        el("td", {}, el("span", { class: "mono", text: op.id }), op.name && op.name !== op.id ? el("span", { class: "note", text: ` — ${op.name}` }) : null),
        el("td", {}, badge(op.executor, EXECUTOR_WORDS[op.executor] || op.executor)),
        el("td", { text: op.fallback || "—" }),
        el("td", {}, op.executor === "none"
          ? el("span", { class: "warning coverage-warning" }, "Warning: no runtime coverage",
            el("span", { class: "why", text: op.reason }))
          : "covered")))))))
  );
}

// -- health ---------------------------------------------------------------------------------

function table(caption, heads, rows, empty, nowrap = []) {
  if (!rows.length) return el("p", { class: "note", text: empty });
  const wrap = (index) => (nowrap.includes(index) ? "nowrap" : null);
  return el("table", {},
    el("caption", { class: "visually-hidden", text: caption }),
    el("thead", {}, el("tr", {}, ...heads.map((h, i) => el("th", { scope: "col", class: wrap(i), text: h })))),
    el("tbody", {}, ...rows.map((cells) => el("tr", {}, ...cells.map((cell, i) => el("td", { class: wrap(i) }, cell))))));
}

function queueDepth(metrics) {
  const depth = [];
  for (const line of String(metrics).split("\n")) {
    const match = /^corral_queue_jobs\{state="([^"]*)"\} ([0-9.eE+-]+)$/.exec(line.trim());
    if (match) depth.push([match[1], Number(match[2])]);
  }
  return depth;
}

const EVENT_WORDS = {
  "node.attempt_failed": "attempt failed",
  "node.fallback": "fell back to the generic executor",
  "node.circuit_open": "refused: circuit open",
  "breaker.transition": "breaker changed state",
  "node.conflict": "idempotency conflict",
  "run.handed_back": "run handed back by its worker",
  "run.finished": "run failed",
};

async function showHealth() {
  const parts = {
    ready: async () => {
      const body = await api("/readyz", { answers503: true }); // not ready: 503 with the checks
      return [el("p", {}, badge(body.ready ? "ok" : "bad", body.ready ? "ready" : "not ready"), " ",
        el("span", { class: "note mono", text: body.deployment })),
      table("Readiness checks", ["Check", "Outcome"], Object.entries(body.checks).map(([name, outcome]) =>
        [name, outcome === "ok" ? badge("ok") : el("span", {}, badge("bad", "failing"), " ", outcome)]), "No checks.")];
    },
    queue: async () => {
      const depth = queueDepth(await api("/metrics"));
      return [table("Jobs in the queue by state", ["State", "Jobs"], depth.map(([state, count]) => [state, String(count)]), "The queue reports no jobs.")];
    },
    workers: async () => {
      const body = await api("/api/workers");
      return [table("Workers seen", ["Worker", "Host", "PID", "Running", "Last heartbeat", "Heartbeat"],
        body.workers.map((w) => [el("span", { class: "mono", text: w.id }), w.host, String(w.pid), String(w.running),
          `${when(w.last_heartbeat)} (${ago(w.last_heartbeat)})`, badge(w.fresh ? "fresh" : "stale")]),
        "No worker has sent a heartbeat lately: start `corral worker`, or ENABLE_INLINE_WORKER.")];
    },
    breakers: async () => {
      const body = await api("/api/breakers");
      return [table("Circuit breakers not closed", ["Breaker", "State", "Failures", "Opened", "Action"],
        body.breakers.map((b) => [el("span", { class: "mono", text: b.name }), badge(b.state, b.state.replace("_", "-")),
          String(b.failures), when(b.opened_at),
          el("button", { type: "button", class: "quiet", "aria-label": `Reset breaker ${b.name}`, onclick: () => resetBreaker(b.name) }, "Reset")]),
        "No breaker is open, half-open or counting failures.")];
    },
    events: async () => {
      const body = await api("/api/console/events?limit=30");
      return [table("Recent actionable events, newest first", ["When", "Event", "Run", "Node", "Details"],
        body.events.map((e) => [when(e.ts), EVENT_WORDS[e.event] || e.event,
          el("a", { class: "mono", href: `#/run/${encodeURIComponent(e.run)}`, text: e.run }),
          el("span", { class: "mono", text: e.fields.node || "—" }),
          describeEvent({ ...e.fields, node: undefined })]),
        "No failed attempts, fallbacks or breaker transitions in the newest runs.", [0, 2])];
    },
  };
  await Promise.all(Object.entries(parts).map(async ([name, load]) => {
    const where = $(`health-${name}`);
    try {
      clear(where).append(...await load());
    } catch (error) {
      failed(where, error);
    }
  }));
  $("health-updated").textContent = `Updated ${when(Date.now() / 1000)}`;
}

async function resetBreaker(name) {
  try {
    await api(`/api/breakers/${encodeURIComponent(name).replace(/%2F/gi, "/")}/reset`, { method: "POST" });
    announce(`Breaker ${name} reset`);
  } catch (error) {
    announce(`Could not reset ${name}: ${error.message}`);
  }
  await showHealth();
  $("health-title").focus();
}

// -- playground ------------------------------------------------------------------------------

async function showPlayground() {}

async function runPlayground(event) {
  event.preventDefault();
  const form = $("play-form");
  const problem = $("play-error");
  problem.hidden = true;
  let params;
  try {
    params = JSON.parse(form.params.value || "{}");
  } catch (error) {
    problem.hidden = false;
    problem.textContent = `Params are not valid JSON: ${error.message}`;
    return;
  }
  const limits = {};
  for (const name of ["max_memory_mb", "max_cpu_ms"]) if (form[name].value) limits[name] = Number(form[name].value);
  const request = { code: form.code.value, params, limits };
  if (form.timeout_ms.value) request.timeout_ms = Number(form.timeout_ms.value);
  if (form.executor.value) request.executor = form.executor.value;
  const button = $("play-run");
  button.disabled = true;
  button.textContent = "Running…";
  const out = clear($("play-outcome"));
  $("play-result").hidden = false;
  try {
    const result = await api("/api/sandbox/execute", { json: request });
    const usage = result.usage || {};
    out.append(...[
      el("p", {}, badge(result.ok ? "ok" : "bad", result.ok ? "succeeded" : "failed"), " ",
        el("span", { class: "note", text: `executor: ${result.executor ?? "—"}` })),
      errorBlock(result.error, "playground"),
      el("dl", { class: "facts" }, facts([
        ["Wall time", ms(usage.wall_ms)], ["CPU", ms(usage.cpu_ms)], ["Peak memory", megabytes(usage.peak_memory_bytes)],
      ])),
      el("h3", { text: "Output" }), el("pre", { class: "output", tabindex: "0", id: "play-output", text: result.ok ? pretty(result.output) : "(none: the execution failed)" }),
      el("h3", { text: `Logs (${result.logs.length})` }),
      el("pre", { class: "logs", tabindex: "0", id: "play-logs", text: result.logs.map((l) => `[${l.level}] ${l.message}`).join("\n") || "(no logs)" }),
    ].filter(Boolean));
    announce(result.ok ? "The execution succeeded" : `The execution failed: ${result.error && result.error.type}`);
  } catch (error) {
    if (!(error instanceof Unauthorized)) out.append(el("p", { class: "error-text", role: "alert", text: error.message }));
  } finally {
    button.disabled = false;
    button.textContent = "Run in the sandbox";
  }
}

// -- wiring ------------------------------------------------------------------------------------

document.addEventListener("DOMContentLoaded", () => {
  $("login-form").addEventListener("submit", login);
  $("forget").addEventListener("click", () => {
    sessionStorage.removeItem(TOKEN_KEY);
    showLogin("");
  });
  $("runs-filter").addEventListener("submit", (event) => {
    event.preventDefault();
    runsPage.cursors = [null];
    runsPage.index = 0;
    loadRuns();
  });
  $("page-older").addEventListener("click", () => {
    if (!runsPage.next) return;
    runsPage.cursors = runsPage.cursors.slice(0, runsPage.index + 1).concat([runsPage.next]);
    runsPage.index += 1;
    loadRuns();
  });
  $("page-newer").addEventListener("click", () => {
    if (runsPage.index === 0) return;
    runsPage.index -= 1;
    loadRuns();
  });
  $("select-all").addEventListener("change", (event) => {
    for (const box of document.querySelectorAll("#runs-table .pick")) box.checked = event.target.checked;
  });
  $("bulk-retry").addEventListener("click", () => bulk("retry"));
  $("bulk-cancel").addEventListener("click", () => bulk("cancel"));
  $("runs-refresh").addEventListener("click", () => loadRuns());
  $("start-form").addEventListener("submit", startRun);
  $("run-retry").addEventListener("click", () => runAction("retry"));
  $("run-cancel").addEventListener("click", () => runAction("cancel"));
  $("health-refresh").addEventListener("click", () => showHealth());
  $("caps-uncovered").addEventListener("change", () => showCapabilities());
  $("play-form").addEventListener("submit", runPlayground);
  window.addEventListener("hashchange", route);
  $("forget").hidden = !sessionStorage.getItem(TOKEN_KEY);
  route();
});
