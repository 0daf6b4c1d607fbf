// Outpost HQ dashboard: one plain ES module, no dependencies, no build step.
//
// It talks only to HQ's REST API (/api/v1) with the admin token the user pastes on the login
// screen; the token lives in sessionStorage and "Sign out" removes it. Everything the API
// returns is untrusted (agent names, connection names, SQL, result rows, error messages): it
// reaches the page only as text (textContent, text nodes, attribute values), never as HTML.

const API = "/api/v1";
const TOKEN_KEY = "outpost.hq.adminToken";
const REFRESH_MS = 5000;
// Long-poll a job this long: HQ answers at once when the job ends, and the short wait lets the
// page follow queued -> sent -> running as it happens.
const WAIT_SECONDS = 2;
const JOBS_PAGE = 25;
const ROWS_PAGE = 500;
const FINAL_STATES = new Set(["succeeded", "failed", "expired", "cancelled"]);
const NAME_PATTERN = /^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$/;
const NAME_RULE = "use 1 to 63 letters, digits, '.', '_' or '-', starting with a letter or digit";
const REFUSED = "The admin token was refused.";

const $ = (id) => document.getElementById(id);

// ---------------------------------------------------------------------------------------------
// DOM helpers: strings always become text nodes.

function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(props)) {
    if (value === undefined || value === null || value === false) continue;
    if (key === "class") node.className = value;
    else if (key === "dataset") Object.assign(node.dataset, value);
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, value === true ? "" : String(value));
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined || child === false) continue;
    node.append(child instanceof Node ? child : String(child));
  }
  return node;
}

function showNotice(id, message) {
  const node = $(id);
  node.textContent = message;
  node.hidden = !message;
}

function errorText(err) {
  return err instanceof Error ? err.message : String(err);
}

/** Replace a tbody's rows, keeping keyboard focus on the "same" control if it had it. */
function replaceRows(tbody, rows) {
  const active = document.activeElement;
  const key = active && tbody.contains(active) ? active.dataset.focusKey : undefined;
  tbody.replaceChildren(...rows);
  if (key) {
    for (const node of tbody.querySelectorAll("[data-focus-key]")) {
      if (node.dataset.focusKey === key) {
        node.focus();
        break;
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Formatting

const relativeFormat = new Intl.RelativeTimeFormat("en", { numeric: "auto" });

function relativeTime(ts) {
  if (ts === null || ts === undefined) return "never";
  const seconds = ts - Date.now() / 1000;
  const abs = Math.abs(seconds);
  if (abs < 5) return "just now";
  if (abs < 60) return relativeFormat.format(Math.round(seconds), "second");
  if (abs < 3600) return relativeFormat.format(Math.round(seconds / 60), "minute");
  if (abs < 86400) return relativeFormat.format(Math.round(seconds / 3600), "hour");
  return relativeFormat.format(Math.round(seconds / 86400), "day");
}

function absoluteTime(ts) {
  if (ts === null || ts === undefined) return "";
  return new Date(ts * 1000).toLocaleString(undefined, {
    dateStyle: "medium",
    timeStyle: "medium",
  });
}

function timeCell(ts) {
  return el("td", { title: absoluteTime(ts) || null }, relativeTime(ts));
}

function formatSeconds(seconds) {
  if (seconds === null || seconds === undefined || Number.isNaN(seconds)) return "";
  if (seconds < 0) seconds = 0;
  if (seconds < 1) return `${Math.round(seconds * 1000)} ms`;
  if (seconds < 10) return `${seconds.toFixed(2)} s`;
  if (seconds < 60) return `${seconds.toFixed(1)} s`;
  const minutes = Math.floor(seconds / 60);
  if (minutes < 60) return `${minutes} min ${Math.round(seconds % 60)} s`;
  return `${Math.floor(minutes / 60)} h ${minutes % 60} min`;
}

function jobDuration(job) {
  const start = job.started_at ?? null;
  if (start === null) return "";
  if (job.finished_at !== null && job.finished_at !== undefined) {
    return formatSeconds(job.finished_at - start);
  }
  return FINAL_STATES.has(job.state) ? "" : `${formatSeconds(Date.now() / 1000 - start)}…`;
}

function yesNo(value) {
  if (value === null || value === undefined) return "";
  return value ? "Yes" : "No";
}

function cellText(value) {
  if (value === null || value === undefined) return null;
  if (typeof value === "object") return JSON.stringify(value);
  return String(value);
}

function valueCell(value) {
  const text = cellText(value);
  if (text === null) return el("td", { class: "null" }, "NULL");
  return el("td", { class: typeof value === "number" ? "num" : null }, text);
}

function stateBadge(state) {
  return el("span", { class: `state state-${state}` }, state);
}

function shortId(id) {
  return id.slice(0, 8);
}

// ---------------------------------------------------------------------------------------------
// The API

class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

function messageOf(data) {
  if (!data || typeof data !== "object") return "";
  if (typeof data.message === "string") return data.message;
  if (typeof data.detail === "string") return data.detail;
  if (Array.isArray(data.detail)) {
    return data.detail
      .map((item) => {
        const where = Array.isArray(item.loc) ? item.loc.filter((p) => p !== "body").join(".") : "";
        return where ? `${where}: ${item.msg}` : String(item.msg);
      })
      .join("; ");
  }
  return "";
}

function getToken() {
  return sessionStorage.getItem(TOKEN_KEY) || "";
}

async function api(method, path, body, token = getToken()) {
  const headers = { Accept: "application/json", Authorization: `Bearer ${token}` };
  const init = { method, headers, cache: "no-store", credentials: "omit" };
  if (body !== undefined) {
    headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  let response;
  try {
    response = await fetch(API + path, init);
  } catch {
    throw new ApiError(0, "unreachable", "HQ did not answer; check that it is running and reload.");
  }
  let data = null;
  if (response.status !== 204) {
    try {
      data = await response.json();
    } catch {
      data = null;
    }
  }
  if (!response.ok) {
    if (response.status === 401 || response.status === 403) {
      signOut(REFUSED);
      throw new ApiError(response.status, "unauthorized", REFUSED);
    }
    const message = messageOf(data) || `HQ answered ${response.status} ${response.statusText}.`;
    throw new ApiError(response.status, data?.code ?? "", message);
  }
  return data;
}

const enc = encodeURIComponent;

function query(params) {
  const search = new URLSearchParams();
  for (const [key, value] of Object.entries(params)) {
    if (value !== "" && value !== null && value !== undefined) search.set(key, String(value));
  }
  const text = search.toString();
  return text ? `?${text}` : "";
}

/** Poll a job with long waits until it reaches a final state. */
async function waitForJob(id, onUpdate) {
  for (;;) {
    const job = await api("GET", `/jobs/${enc(id)}${query({ wait: WAIT_SECONDS })}`);
    onUpdate(job);
    if (FINAL_STATES.has(job.state) || !session.signedIn) return job;
  }
}

// ---------------------------------------------------------------------------------------------
// Session: login, sign out, periodic refresh

const session = {
  signedIn: false,
  refreshing: false,
  timer: null,
  view: null,
  agents: [],
  connections: [],
};

function showLogin(message, { keepToken = false } = {}) {
  $("app").hidden = true;
  $("login").hidden = false;
  showNotice("login-error", message || "");
  if (!keepToken) $("login-token").value = "";
  $("login-token").focus();
}

function signOut(message) {
  sessionStorage.removeItem(TOKEN_KEY);
  const wasIn = session.signedIn;
  session.signedIn = false;
  if (session.timer !== null) clearInterval(session.timer);
  session.timer = null;
  session.agents = [];
  session.connections = [];
  if (wasIn || message) clearData();
  showLogin(message);
}

/** Forget everything shown from HQ (the next user of this tab sees nothing of it). */
function clearData() {
  for (const table of document.querySelectorAll("table.grid tbody")) table.replaceChildren();
  for (const id of ["connections-agent", "jobs-agent"]) {
    $(id).replaceChildren(el("option", { value: "" }, "All agents"));
  }
  for (const id of ["query-agent", "query-connection", "schema-agent", "schema-connection"]) {
    $(id).replaceChildren();
  }
  for (const select of document.querySelectorAll("select[data-signature]")) {
    delete select.dataset.signature;
  }
  for (const id of ["query-result", "schema-result", "job-detail-body", "job-detail-fields"]) {
    $(id).replaceChildren();
  }
  for (const id of ["query-status", "schema-status", "hq-info"]) $(id).textContent = "";
  for (const id of ["agents-error", "connections-error", "jobs-error", "query-error",
    "schema-error", "global-error"]) {
    showNotice(id, "");
  }
  hideToken();
  $("job-detail").hidden = true;
  $("query-sql").value = "";
}

async function signIn(token) {
  const button = $("login-form").querySelector("button[type=submit]");
  button.disabled = true;
  let info;
  try {
    info = await api("GET", "/hq", undefined, token);
  } catch (err) {
    if (err.status !== 401 && err.status !== 403) showLogin(errorText(err), { keepToken: true });
    return;
  } finally {
    button.disabled = false;
  }
  sessionStorage.setItem(TOKEN_KEY, token);
  session.signedIn = true;
  showHqInfo(info);
  $("login").hidden = true;
  $("app").hidden = false;
  if (session.timer !== null) clearInterval(session.timer);
  session.timer = setInterval(refreshTick, REFRESH_MS);
  await route();
}

function showHqInfo(info) {
  $("hq-info").textContent = `HQ ${info.version} · ${info.agents_online} online`;
  $("hq-info").title = `HQ id ${info.hq_id}`;
}

async function refreshTick() {
  if (!session.signedIn || session.refreshing || document.visibilityState === "hidden") return;
  const view = VIEWS[session.view];
  session.refreshing = true;
  try {
    if (view && view.refresh) await view.refresh();
    showNotice("global-error", "");
  } catch (err) {
    if (session.signedIn) showNotice("global-error", errorText(err));
  } finally {
    session.refreshing = false;
  }
}

// ---------------------------------------------------------------------------------------------
// Shared lists: agents and connections (for the tables and the selects)

async function loadAgents() {
  const data = await api("GET", "/agents");
  session.agents = data.agents;
  const online = session.agents.filter((a) => a.online).length;
  const info = $("hq-info").textContent.replace(/· \d+ online$/, `· ${online} online`);
  $("hq-info").textContent = info;
  return session.agents;
}

async function loadConnections() {
  const data = await api("GET", "/connections");
  session.connections = data.connections;
  return session.connections;
}

function fillAgentSelect(select, { blank = null } = {}) {
  const choices = session.agents.map((a) => [a.name, a.online ? a.name : `${a.name} (offline)`]);
  if (blank !== null) choices.unshift(["", blank]);
  // Rebuilding the options closes an open drop-down: only do it when they changed.
  const signature = JSON.stringify(choices);
  if (select.dataset.signature === signature) return;
  select.dataset.signature = signature;
  const current = select.value;
  select.replaceChildren(...choices.map(([value, label]) => el("option", { value }, label)));
  if (choices.some(([value]) => value === current)) select.value = current;
}

function fillConnectionSelect(select, agent) {
  const current = select.value;
  const conns = session.connections.filter((c) => c.agent === agent);
  const options = conns.map((c) =>
    el("option", { value: c.slug }, c.on_agent ? `${c.name} (${c.slug})` : `${c.name} (${c.slug}, not on agent)`),
  );
  if (options.length === 0) options.push(el("option", { value: "" }, "No connections"));
  select.replaceChildren(...options);
  if (conns.some((c) => c.slug === current)) select.value = current;
  else {
    const first = conns.find((c) => c.on_agent) ?? conns[0];
    if (first) select.value = first.slug;
  }
}

// ---------------------------------------------------------------------------------------------
// Confirm dialog

function confirmAction(text, okLabel) {
  const dialog = $("confirm");
  $("confirm-text").textContent = text;
  $("confirm-ok").textContent = okLabel;
  return new Promise((resolve) => {
    dialog.addEventListener("close", () => resolve(dialog.returnValue === "ok"), { once: true });
    dialog.returnValue = "";
    dialog.showModal();
    $("confirm-ok").focus();
  });
}

// ---------------------------------------------------------------------------------------------
// Agents view

function agentRow(agent) {
  const status = agent.online ? "online" : "offline";
  const action = agent.revoked
    ? el("button", {
      type: "button",
      dataset: { focusKey: `token:${agent.name}` },
      "aria-label": `New token for ${agent.name}`,
      onclick: () => reissueToken(agent.name),
    }, "New token")
    : el("button", {
      type: "button",
      class: "danger",
      dataset: { focusKey: `revoke:${agent.name}` },
      "aria-label": `Revoke ${agent.name}`,
      onclick: () => revokeAgent(agent.name),
    }, "Revoke");
  return el("tr", { dataset: { agent: agent.name } },
    el("td", {}, agent.name),
    el("td", { class: "status" },
      el("span", { class: `dot ${status}`, "aria-hidden": "true" }), status),
    timeCell(agent.last_seen),
    el("td", {}, agent.version ?? ""),
    el("td", {}, agent.transport ?? ""),
    el("td", { class: "num" }, String(agent.connections)),
    el("td", { class: agent.revoked ? "revoked" : "" }, yesNo(agent.revoked)),
    el("td", { class: "actions" }, action),
  );
}

async function refreshAgents() {
  const agents = await loadAgents();
  replaceRows($("agents-table").tBodies[0], agents.map(agentRow));
  $("agents-empty").hidden = agents.length > 0;
  showNotice("agents-error", "");
}

function showToken(title, token) {
  $("agent-token-title").textContent = title;
  $("agent-token-command").textContent =
    `outpost login --hq ${window.location.origin} --token ${token}`;
  $("agent-token-copied").textContent = "";
  $("agent-token").hidden = false;
  $("agent-token-copy").focus();
}

function hideToken() {
  $("agent-token").hidden = true;
  $("agent-token-command").textContent = "";
  $("agent-token-title").textContent = "";
}

async function copyCommand() {
  const text = $("agent-token-command").textContent;
  try {
    await navigator.clipboard.writeText(text);
    $("agent-token-copied").textContent = "Copied.";
  } catch {
    const range = document.createRange();
    range.selectNodeContents($("agent-token-command"));
    const selection = window.getSelection();
    selection.removeAllRanges();
    selection.addRange(range);
    $("agent-token-copied").textContent = "Could not copy; the command is selected, press Ctrl+C.";
  }
}

async function createAgent(event) {
  event.preventDefault();
  const name = $("agent-name").value.trim();
  if (!NAME_PATTERN.test(name)) {
    showNotice("agents-error",
      name ? `Agent name '${name}' is not valid: ${NAME_RULE}.` : "Type a name for the new agent.");
    $("agent-name").focus();
    return;
  }
  try {
    const created = await api("POST", "/agents", { name });
    showNotice("agents-error", "");
    $("agent-name").value = "";
    showToken(`Agent ${created.agent.name} created.`, created.token);
    await refreshAgents();
  } catch (err) {
    showNotice("agents-error", errorText(err));
  }
}

async function revokeAgent(name) {
  const ok = await confirmAction(
    `Revoke agent ${name}? Its token stops working and a connected agent is disconnected.`,
    "Revoke",
  );
  if (!ok) return;
  try {
    await api("POST", `/agents/${enc(name)}/revoke`);
    await refreshAgents();
  } catch (err) {
    showNotice("agents-error", errorText(err));
  }
}

async function reissueToken(name) {
  const ok = await confirmAction(
    `Issue a new token for agent ${name}? Any older token stops working.`,
    "Issue token",
  );
  if (!ok) return;
  try {
    const issued = await api("POST", `/agents/${enc(name)}/token`);
    showToken(`New token for agent ${issued.agent.name}.`, issued.token);
    await refreshAgents();
  } catch (err) {
    showNotice("agents-error", errorText(err));
  }
}

// ---------------------------------------------------------------------------------------------
// Connections view

function connectionRow(conn) {
  return el("tr", {},
    el("td", {}, conn.agent),
    el("td", {}, conn.name),
    el("td", {}, conn.slug),
    el("td", {}, conn.driver),
    el("td", {}, yesNo(conn.on_agent)),
    el("td", {
      class: conn.up === false ? "down" : "",
      title: conn.checked_at ? `checked ${absoluteTime(conn.checked_at)}` : null,
    }, yesNo(conn.up)),
  );
}

async function refreshConnections() {
  await Promise.all([loadAgents(), loadConnections()]);
  const select = $("connections-agent");
  fillAgentSelect(select, { blank: "All agents" });
  const agent = select.value;
  const conns = session.connections.filter((c) => !agent || c.agent === agent);
  replaceRows($("connections-table").tBodies[0], conns.map(connectionRow));
  $("connections-empty").hidden = conns.length > 0;
  showNotice("connections-error", "");
}

// ---------------------------------------------------------------------------------------------
// Jobs view

const jobs = { before: [], page: [], detailId: null };

function jobRow(job) {
  const open = () => showJob(job.id);
  return el("tr", {
    class: job.id === jobs.detailId ? "job-row selected" : "job-row",
    dataset: { job: job.id },
    onclick: (event) => {
      if (!(event.target instanceof HTMLButtonElement)) open();
    },
  },
  el("td", {},
    el("button", {
      type: "button",
      class: "link mono",
      dataset: { focusKey: `job:${job.id}` },
      "aria-label": `Job ${job.id} details`,
      onclick: open,
    }, shortId(job.id))),
  el("td", {}, stateBadge(job.state)),
  el("td", {}, job.kind),
  el("td", {}, job.agent),
  el("td", {}, job.connection),
  timeCell(job.created_at),
  el("td", { class: "num" }, jobDuration(job)),
  el("td", { class: "error-cell", title: job.error ?? null }, job.error ?? ""),
  );
}

async function refreshJobs() {
  const agentSelect = $("jobs-agent");
  if (session.agents.length === 0 || agentSelect.options.length <= 1) await loadAgents();
  fillAgentSelect(agentSelect, { blank: "All agents" });
  const before = jobs.before.at(-1) ?? null;
  const data = await api("GET", `/jobs${query({
    agent: agentSelect.value,
    state: $("jobs-state").value,
    kind: $("jobs-kind").value,
    limit: JOBS_PAGE,
    before,
  })}`);
  jobs.page = data.jobs;
  replaceRows($("jobs-table").tBodies[0], data.jobs.map(jobRow));
  $("jobs-empty").hidden = data.jobs.length > 0;
  $("jobs-older").disabled = data.jobs.length < JOBS_PAGE;
  $("jobs-newest").disabled = jobs.before.length === 0;
  $("jobs-page").textContent = `Page ${jobs.before.length + 1}`;
  showNotice("jobs-error", "");
  if (jobs.detailId !== null && !$("job-detail").hidden) {
    const shown = data.jobs.find((j) => j.id === jobs.detailId);
    if (shown && shown.state !== $("job-detail").dataset.state) await showJob(jobs.detailId, false);
  }
}

async function resetJobs() {
  jobs.before = [];
  await runIn("jobs-error", refreshJobs);
}

function field(list, name, value) {
  if (value === null || value === undefined || value === "") return;
  list.append(el("dt", {}, name), el("dd", {}, value));
}

async function showJob(id, focus = true) {
  let job;
  try {
    job = await api("GET", `/jobs/${enc(id)}`);
  } catch (err) {
    showNotice("jobs-error", errorText(err));
    return;
  }
  jobs.detailId = id;
  for (const row of $("jobs-table").tBodies[0].rows) {
    row.classList.toggle("selected", row.dataset.job === id);
  }
  const panel = $("job-detail");
  panel.dataset.state = job.state;
  $("job-detail-title").textContent = `Job ${job.id}`;
  const list = $("job-detail-fields");
  list.replaceChildren();
  field(list, "State", stateBadge(job.state));
  field(list, "Kind", job.kind);
  field(list, "Agent", job.agent);
  field(list, "Connection", job.connection);
  for (const [label, key] of [["Created", "created_at"], ["Sent", "sent_at"],
    ["Started", "started_at"], ["Finished", "finished_at"]]) {
    if (job[key] !== null && job[key] !== undefined) {
      field(list, label, `${absoluteTime(job[key])} (${relativeTime(job[key])})`);
    }
  }
  if (!FINAL_STATES.has(job.state)) field(list, "Expires", absoluteTime(job.expires_at));
  field(list, "Duration", jobDuration(job));
  field(list, "Time limit", formatSeconds(job.timeout));
  field(list, "Attempts", String(job.attempts));
  const params = job.params || {};
  if (params.max_rows !== undefined) field(list, "Max rows", String(params.max_rows));
  if (params.allow_writes) field(list, "Allow writes", "Yes");
  if (Array.isArray(params.schemas) && params.schemas.length) {
    field(list, "Schemas", params.schemas.join(", "));
  }
  if (Array.isArray(params.params) && params.params.length) {
    field(list, "Parameters", JSON.stringify(params.params));
  }
  const body = $("job-detail-body");
  body.replaceChildren();
  if (typeof params.sql === "string") {
    body.append(el("h3", {}, "SQL"), el("pre", { class: "sql" }, params.sql));
  }
  if (job.error) body.append(el("p", { class: "notice error" }, job.error));
  else if (job.state === "expired") body.append(el("p", { class: "notice error" }, expiredText(job)));
  if (job.state === "succeeded" && job.result) {
    try {
      if (job.kind === "query") body.append(await queryResultView(job));
      else if (job.kind === "inspect") body.append(inspectView(job.result));
      else body.append(testResultView(job.result));
    } catch (err) {
      body.append(el("p", { class: "notice error" }, errorText(err)));
    }
  }
  const cancel = $("job-cancel");
  cancel.hidden = FINAL_STATES.has(job.state);
  cancel.dataset.job = job.id;
  panel.hidden = false;
  if (focus) {
    panel.scrollIntoView({ block: "nearest" });
    $("job-detail-close").focus();
  }
}

function expiredText(job) {
  return `The job expired before agent ${job.agent} started it; check that the agent is online.`;
}

function testResultView(result) {
  const list = el("dl", { class: "fields" });
  field(list, "Up", yesNo(result.up));
  field(list, "Server version", result.server_version ?? "");
  field(list, "Took", formatSeconds(result.duration_seconds));
  field(list, "Error", result.error ?? "");
  return el("div", {}, el("h3", {}, "Connection test"), list);
}

async function cancelJob(id, errorId) {
  try {
    await api("POST", `/jobs/${enc(id)}/cancel`);
  } catch (err) {
    showNotice(errorId, errorText(err));
  }
}

// ---------------------------------------------------------------------------------------------
// Query results (Query view and job details)

function resultSummary(job) {
  const result = job.result || {};
  const parts = [];
  const count = result.row_count ?? 0;
  parts.push(`${count} ${count === 1 ? "row" : "rows"}`);
  if (result.duration_seconds !== undefined) parts.push(formatSeconds(result.duration_seconds));
  if (result.truncated) parts.push(`stopped at max rows (${job.params?.max_rows ?? "?"})`);
  return parts.join(" · ");
}

async function queryResultView(job) {
  const result = job.result || {};
  const wrap = el("div", { class: "result" });
  wrap.append(el("p", { class: "summary" }, resultSummary(job)));
  if (Array.isArray(result.notices)) {
    for (const notice of result.notices) wrap.append(el("p", { class: "notice" }, String(notice)));
  }
  const columns = Array.isArray(result.columns) ? result.columns : [];
  if (columns.length === 0) return wrap;
  const tbody = el("tbody");
  const table = el("table", { class: "grid result-table" },
    el("caption", { class: "visually-hidden" }, `Result of job ${job.id}`),
    el("thead", {}, el("tr", {}, columns.map((c) => el("th", { scope: "col" }, String(c))))),
    tbody,
  );
  const more = el("button", { type: "button", hidden: true }, "Show more rows");
  const shown = el("span", { class: "muted" });
  let next = 0;
  const loadPage = async () => {
    const page = await api("GET", `/jobs/${enc(job.id)}/rows${query({ offset: next, limit: ROWS_PAGE })}`);
    tbody.append(...page.rows.map((row) => el("tr", {}, row.map(valueCell))));
    next = page.next_offset;
    more.hidden = next === null || next === undefined;
    shown.textContent = more.hidden ? "" : `Showing ${tbody.rows.length} of ${page.row_count} rows.`;
  };
  more.addEventListener("click", () => {
    loadPage().catch((err) => { shown.textContent = errorText(err); });
  });
  await loadPage();
  wrap.append(el("div", { class: "table-wrap" }, table), el("div", { class: "pager" }, more, shown));
  return wrap;
}

// ---------------------------------------------------------------------------------------------
// Inspect documents (Schema view and job details)

function columnsTable(item, caption) {
  const pk = new Set(item.primary_key?.columns ?? []);
  const fkOf = new Map();
  for (const fk of item.foreign_keys ?? []) {
    fk.columns.forEach((column, i) => {
      const target = [fk.referred_schema, fk.referred_table].filter(Boolean).join(".");
      fkOf.set(column, `FK → ${target}.${fk.referred_columns?.[i] ?? "?"}`);
    });
  }
  const rows = (item.columns ?? []).map((c) => {
    const keys = [pk.has(c.name) ? "PK" : "", fkOf.get(c.name) ?? ""].filter(Boolean).join(", ");
    return el("tr", {},
      el("td", {}, c.name),
      el("td", { class: "mono" }, c.type ?? ""),
      el("td", {}, c.nullable ? "NULL" : "NOT NULL"),
      el("td", { class: "mono" }, c.default ?? ""),
      el("td", {}, keys));
  });
  return el("div", { class: "table-wrap" }, el("table", { class: "grid compact" },
    el("caption", { class: "visually-hidden" }, caption),
    el("thead", {}, el("tr", {}, ["COLUMN", "TYPE", "NULLABLE", "DEFAULT", "KEY"].map(
      (h) => el("th", { scope: "col" }, h)))),
    el("tbody", {}, rows)));
}

const cols = (list) => `(${(list ?? []).join(", ")})`;

function tableDetails(table, schemaName) {
  const facts = el("ul", { class: "facts" });
  if (table.primary_key) {
    facts.append(el("li", {}, el("span", { class: "tag" }, "primary key"), " ",
      table.primary_key.name ? `${table.primary_key.name} ` : "", cols(table.primary_key.columns)));
  }
  for (const fk of table.foreign_keys ?? []) {
    const target = [fk.referred_schema, fk.referred_table].filter(Boolean).join(".");
    facts.append(el("li", {}, el("span", { class: "tag" }, "foreign key"), " ",
      fk.name ? `${fk.name} ` : "", `${cols(fk.columns)} → ${target} ${cols(fk.referred_columns)}`));
  }
  for (const index of table.indexes ?? []) {
    facts.append(el("li", {}, el("span", { class: "tag" }, index.unique ? "unique index" : "index"),
      " ", `${index.name ?? ""} ${cols(index.columns)}`));
  }
  const count = (table.columns ?? []).length;
  return el("details", { class: "tree-item", dataset: { table: `${schemaName}.${table.name}` } },
    el("summary", {}, el("span", { class: "kind" }, "table"), " ", table.name,
      el("span", { class: "muted" }, ` ${count} ${count === 1 ? "column" : "columns"}`)),
    table.comment ? el("p", { class: "muted" }, table.comment) : null,
    columnsTable(table, `Columns of ${table.name}`),
    facts.childElementCount ? facts : null);
}

function viewDetails(view, schemaName) {
  return el("details", { class: "tree-item", dataset: { view: `${schemaName}.${view.name}` } },
    el("summary", {}, el("span", { class: "kind" }, "view"), " ", view.name),
    columnsTable(view, `Columns of ${view.name}`),
    view.definition ? el("pre", { class: "sql" }, view.definition) : null);
}

function filterTree(root, text) {
  const needle = text.trim().toLowerCase();
  for (const item of root.querySelectorAll("details.tree-item")) {
    const name = (item.dataset.table ?? item.dataset.view ?? "").toLowerCase();
    item.hidden = needle !== "" && !name.includes(needle);
  }
}

let filterCount = 0;

function inspectView(doc) {
  const schemas = Array.isArray(doc.schemas) ? doc.schemas : [];
  const filterId = `tree-filter-${++filterCount}`;
  const root = el("div", { class: "tree" },
    el("div", { class: "toolbar" },
      el("p", { class: "summary" },
        `${doc.driver ?? "?"} · ${doc.database ?? ""}`.replace(/ · $/, "")),
      el("label", { for: filterId }, "Filter tables and views"),
      el("input", {
        id: filterId,
        type: "search",
        autocomplete: "off",
        spellcheck: "false",
        oninput: (event) => filterTree(root, event.target.value),
      })));
  for (const schema of schemas) {
    const tables = schema.tables ?? [];
    const views = schema.views ?? [];
    root.append(el("details", { class: "tree-schema", open: schemas.length === 1 },
      el("summary", {}, el("span", { class: "kind" }, "schema"), " ", schema.name ?? "(default)",
        el("span", { class: "muted" },
          ` ${tables.length} ${tables.length === 1 ? "table" : "tables"},` +
          ` ${views.length} ${views.length === 1 ? "view" : "views"}`)),
      tables.map((t) => tableDetails(t, schema.name)),
      views.map((v) => viewDetails(v, schema.name))));
  }
  if (schemas.length === 0) root.append(el("p", { class: "muted" }, "No schemas."));
  return root;
}

// ---------------------------------------------------------------------------------------------
// Query and Schema views: choose an agent and a connection, run a job, wait for it.

async function refreshPickers(agentSelect, connectionSelect) {
  await Promise.all([loadAgents(), loadConnections()]);
  fillAgentSelect(agentSelect);
  if (!agentSelect.value) {
    const withConn = session.agents.find((a) => a.online &&
      session.connections.some((c) => c.agent === a.name && c.on_agent));
    if (withConn) agentSelect.value = withConn.name;
  }
  fillConnectionSelect(connectionSelect, agentSelect.value);
}

function runningText(job) {
  const id = shortId(job.id);
  const where = `agent ${job.agent}`;
  const since = (ts) => `${Math.max(0, Math.floor(Date.now() / 1000 - (ts ?? Date.now() / 1000)))} s`;
  switch (job.state) {
    case "queued": return `Job ${id} is queued for ${where}…`;
    case "sent": return `Job ${id} was sent to ${where}…`;
    case "running": return `Job ${id} is running on ${where}… (${since(job.started_at)})`;
    default: return `Job ${id} ${job.state}.`;
  }
}

function failureText(job) {
  if (job.error) return job.error;
  if (job.state === "expired") return expiredText(job);
  if (job.state === "cancelled") return "The job was cancelled.";
  return `The job ended ${job.state}.`;
}

/** Create a job and wait for it; returns the final job (or null after an error shown). */
async function runJob(body, { statusId, errorId, button, cancel }) {
  showNotice(errorId, "");
  button.disabled = true;
  $(statusId).textContent = "Creating the job…";
  try {
    let job = await api("POST", "/jobs", body);
    if (cancel) {
      cancel.hidden = false;
      cancel.onclick = () => cancelJob(job.id, errorId);
    }
    $(statusId).textContent = runningText(job);
    job = await waitForJob(job.id, (update) => {
      $(statusId).textContent = runningText(update);
    });
    return job;
  } catch (err) {
    $(statusId).textContent = "";
    if (session.signedIn) showNotice(errorId, errorText(err));
    return null;
  } finally {
    button.disabled = false;
    if (cancel) {
      cancel.hidden = true;
      cancel.onclick = null;
    }
  }
}

async function runQuery(event) {
  event.preventDefault();
  if ($("query-run").disabled) return; // one job at a time (Ctrl+Enter submits too)
  const agent = $("query-agent").value;
  const connection = $("query-connection").value;
  const sql = $("query-sql").value;
  const maxRows = Number($("query-max-rows").value);
  if (!agent || !connection) {
    showNotice("query-error", "Choose an agent and one of its connections first.");
    return;
  }
  if (!sql.trim()) {
    showNotice("query-error", "Type a SQL statement to run.");
    $("query-sql").focus();
    return;
  }
  if (!Number.isInteger(maxRows) || maxRows < 1 || maxRows > 10_000_000) {
    showNotice("query-error", "Max rows must be a whole number from 1 to 10000000.");
    $("query-max-rows").focus();
    return;
  }
  const timeout = Number($("query-timeout").value);
  if (!Number.isFinite(timeout) || timeout < 1 || timeout > 86_400) {
    showNotice("query-error", "Time limit must be a number of seconds from 1 to 86400.");
    $("query-timeout").focus();
    return;
  }
  $("query-result").replaceChildren();
  const job = await runJob(
    { agent, connection, kind: "query", sql, max_rows: maxRows, timeout,
      allow_writes: $("query-allow-writes").checked },
    { statusId: "query-status", errorId: "query-error", button: $("query-run"),
      cancel: $("query-cancel") },
  );
  if (!job || !session.signedIn) return;
  if (job.state !== "succeeded") {
    $("query-status").textContent = `Job ${shortId(job.id)} ${job.state}.`;
    showNotice("query-error", failureText(job));
    return;
  }
  $("query-status").textContent = `Job ${shortId(job.id)} succeeded.`;
  try {
    $("query-result").replaceChildren(await queryResultView(job));
  } catch (err) {
    showNotice("query-error", errorText(err));
  }
}

async function runInspect(event) {
  event.preventDefault();
  if ($("schema-run").disabled) return;
  const agent = $("schema-agent").value;
  const connection = $("schema-connection").value;
  if (!agent || !connection) {
    showNotice("schema-error", "Choose an agent and one of its connections first.");
    return;
  }
  $("schema-result").replaceChildren();
  const job = await runJob(
    { agent, connection, kind: "inspect" },
    { statusId: "schema-status", errorId: "schema-error", button: $("schema-run") },
  );
  if (!job || !session.signedIn) return;
  if (job.state !== "succeeded") {
    $("schema-status").textContent = `Job ${shortId(job.id)} ${job.state}.`;
    showNotice("schema-error", failureText(job));
    return;
  }
  $("schema-status").textContent = `Job ${shortId(job.id)} succeeded.`;
  $("schema-result").replaceChildren(inspectView(job.result || {}));
}

// ---------------------------------------------------------------------------------------------
// Views and routing

const VIEWS = {
  agents: { enter: refreshAgents, refresh: refreshAgents, errorId: "agents-error" },
  connections: { enter: refreshConnections, refresh: refreshConnections, errorId: "connections-error" },
  jobs: { enter: refreshJobs, refresh: refreshJobs, errorId: "jobs-error" },
  query: {
    enter: () => refreshPickers($("query-agent"), $("query-connection")),
    refresh: null,
    errorId: "query-error",
  },
  schema: {
    enter: () => refreshPickers($("schema-agent"), $("schema-connection")),
    refresh: null,
    errorId: "schema-error",
  },
};

async function runIn(errorId, action) {
  try {
    await action();
  } catch (err) {
    if (session.signedIn) showNotice(errorId, errorText(err));
  }
}

async function route() {
  if (!session.signedIn) return;
  const name = window.location.hash.replace(/^#\/?/, "");
  const viewName = Object.hasOwn(VIEWS, name) ? name : "agents";
  session.view = viewName;
  for (const key of Object.keys(VIEWS)) $(`view-${key}`).hidden = key !== viewName;
  for (const link of document.querySelectorAll("nav a[data-view]")) {
    if (link.dataset.view === viewName) link.setAttribute("aria-current", "page");
    else link.removeAttribute("aria-current");
  }
  document.title = `${viewName[0].toUpperCase()}${viewName.slice(1)} · Outpost HQ`;
  const view = VIEWS[viewName];
  await runIn(view.errorId, view.enter);
}

function init() {
  $("login-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const token = $("login-token").value.trim();
    if (!token) {
      showNotice("login-error", "Paste an admin token to sign in.");
      return;
    }
    signIn(token);
  });
  $("sign-out").addEventListener("click", () => signOut(""));
  window.addEventListener("hashchange", route);

  $("agent-create").addEventListener("submit", createAgent);
  $("agent-token-copy").addEventListener("click", copyCommand);
  $("agent-token-done").addEventListener("click", hideToken);

  $("connections-agent").addEventListener("change",
    () => runIn("connections-error", refreshConnections));

  $("jobs-filter").addEventListener("change", resetJobs);
  $("jobs-filter").addEventListener("submit", (event) => event.preventDefault());
  $("jobs-older").addEventListener("click", () => {
    const last = jobs.page.at(-1);
    if (!last) return;
    jobs.before.push(last.created_at);
    runIn("jobs-error", refreshJobs);
  });
  $("jobs-newest").addEventListener("click", resetJobs);
  $("job-detail-close").addEventListener("click", () => {
    $("job-detail").hidden = true;
    jobs.detailId = null;
    for (const row of $("jobs-table").tBodies[0].rows) row.classList.remove("selected");
  });
  $("job-cancel").addEventListener("click", async () => {
    const id = $("job-cancel").dataset.job;
    await cancelJob(id, "jobs-error");
    await showJob(id, false);
    await runIn("jobs-error", refreshJobs);
  });

  $("query-form").addEventListener("submit", runQuery);
  $("query-agent").addEventListener("change",
    () => fillConnectionSelect($("query-connection"), $("query-agent").value));
  $("query-sql").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) {
      event.preventDefault();
      $("query-form").requestSubmit();
    }
  });
  $("schema-form").addEventListener("submit", runInspect);
  $("schema-agent").addEventListener("change",
    () => fillConnectionSelect($("schema-connection"), $("schema-agent").value));

  const token = getToken();
  if (token) signIn(token);
  else showLogin("");
}

init();
