// Sift playground: a page over the public API only (/v1/collections, /v1/info, /v1/search, /v1/answer).
// Everything from the server is put in the page as text, except snippets, which the server returns
// HTML-escaped with <mark> around the query terms.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { collection: null, lastSearch: null, nextCursor: null, rank: 0, listing: null };

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (key === "class") node.className = value;
    else if (key === "text") node.textContent = value;
    else node.setAttribute(key, value);
  }
  for (const child of children) node.append(child);
  return node;
}

function fmt(value, digits = 4) {
  return typeof value === "number" ? value.toFixed(digits) : "–";
}

function showError(message) {
  const box = $("error");
  box.textContent = message;
  box.hidden = !message;
}

function headers(json) {
  const out = json ? { "content-type": "application/json" } : {};
  const key = $("api-key").value.trim();
  if (key) out.authorization = `Bearer ${key}`;
  return out;
}

async function api(path, body) {
  const init = body === undefined ? { headers: headers(false) } : {
    method: "POST", headers: headers(true), body: JSON.stringify(body),
  };
  const response = await fetch(path, init);
  const data = await response.json().catch(() => ({}));
  if (!response.ok) {
    const error = (data && data.error) || {};
    throw new Error(`${response.status}: ${error.message || response.statusText}`);
  }
  return data;
}

// -- what is served ----------------------------------------------------------------------------------------

async function loadServed() {
  try {
    const listing = await api("/v1/collections");
    const select = $("collection");
    select.replaceChildren(...listing.collections.map((c) => el("option", { value: c.name, text: c.name })));
    select.value = state.collection || listing.default;
    state.listing = listing;
    await describeCollection();
  } catch (err) {
    $("ready").textContent = "not reachable";
    $("ready").className = "badge bad";
    showError(String(err.message || err));
  }
}

// documents sent over HTTP: the collection's ingest backlog, or the newest batch its build holds
function showIngest(listing) {
  const badge = $("ingest");
  const entry = (listing.collections || []).find((c) => c.name === state.collection);
  const ingest = entry && entry.ingest;
  badge.hidden = !ingest;
  if (!ingest) return;
  const pending = ingest.backlog_documents;
  badge.textContent = pending ? `ingest: ${pending} pending` : `ingest: up to date (batch ${ingest.applied_seq})`;
  badge.className = ingest.last_apply_error ? "badge bad" : pending ? "badge" : "badge ok";
  badge.title = ingest.last_apply_error
    ? `the last apply failed (retried): ${ingest.last_apply_error}`
    : `${ingest.backlog_batches} batches waiting; ${ingest.applies.ok} applied by this process`;
}

async function refreshIngest() {
  try {
    state.listing = await api("/v1/collections");
    showIngest(state.listing);
  } catch {
    // the ready badge reports an unreachable server
  }
}

async function describeCollection() {
  state.collection = $("collection").value;
  if (state.listing) showIngest(state.listing);
  try {
    const info = await api(`/v1/info?collection=${encodeURIComponent(state.collection)}`);
    $("build").textContent = info.bundle.build_id || "?";
    $("ready").textContent = "ready";
    $("ready").className = "badge ok";
    for (const option of $("mode").options) option.disabled = !info.modes.includes(option.value);
    if (!info.modes.includes($("mode").value)) $("mode").value = info.modes[0];
    const reranker = info.models && info.models.reranker;
    $("rerank").disabled = !reranker;
    $("rerank").checked = Boolean(reranker);
    $("rerank").parentElement.title = reranker ? `rerank with ${reranker}` : "no reranker is configured";
  } catch (err) {
    $("ready").textContent = "not ready";
    $("ready").className = "badge bad";
    showError(String(err.message || err));
  }
}

// -- search ------------------------------------------------------------------------------------------------

function searchBody() {
  const body = {
    query: $("query").value,
    mode: $("mode").value,
    k: Number($("k").value) || 10,
    rerank: $("rerank").checked,
    collapse: $("collapse").checked,
    highlight: true,
    return_text: false,
    collection: state.collection,
  };
  const filters = $("filters").value.trim();
  if (filters) {
    try {
      body.filters = JSON.parse(filters);
    } catch {
      throw new Error('filters: not JSON; write e.g. {"topic": "astronomy"}');
    }
  }
  return body;
}

function explainTable(explain) {
  const rows = Object.entries(explain).map(([stage, value]) =>
    el("tr", {},
      el("th", { text: stage }),
      el("td", { text: value && value.rank != null ? `#${value.rank}` : "–" }),
      el("td", { text: value ? fmt(value.score) : "–" }),
      el("td", { text: (value && value.note) || (value ? "" : "not retrieved by this stage") })));
  return el("table", { class: "explain" },
    el("thead", {}, el("tr", {}, el("th", { text: "stage" }), el("th", { text: "rank" }),
      el("th", { text: "score" }), el("th", { text: "" }))),
    el("tbody", {}, ...rows));
}

function renderHits(data, append) {
  const list = $("results");
  if (!append) {
    list.replaceChildren();
    state.rank = 0;
  }
  for (const hit of data.hits) {
    state.rank += 1;
    const snippet = el("div", { class: "snippet" });
    snippet.innerHTML = hit.snippet || "";  // escaped by the server; only <mark> is markup
    const docLink = el("a", {
      href: `/v1/documents/${encodeURIComponent(hit.doc_id)}?collection=${encodeURIComponent(state.collection)}`,
      target: "_blank", text: hit.doc_id,
    });
    list.append(el("li", { class: "hit", "data-passage": hit.passage_id },
      el("div", { class: "hit-head" },
        el("span", { class: "rank", text: `${state.rank}.` }),
        el("span", { class: "hit-title", text: hit.title || hit.doc_id }),
        el("span", { class: "hit-meta" }, docLink, ` · passage ${hit.position} · score ${fmt(hit.score)}`)),
      snippet,
      explainTable(hit.explain)));
  }
  const timings = Object.entries(data.timings_ms).map(([k, v]) => `${k} ${v.toFixed(1)} ms`).join(" · ");
  $("summary").textContent =
    `${state.rank} hits · mode ${data.mode} · build ${data.bundle} · ${timings}`;
  $("build").textContent = data.bundle;
  state.nextCursor = data.next_cursor;
  $("more-btn").hidden = !data.next_cursor;
}

async function runSearch(event) {
  event.preventDefault();
  showError("");
  $("search-btn").disabled = true;
  try {
    const body = searchBody();
    const data = await api("/v1/search", body);
    state.lastSearch = body;
    renderHits(data, false);
  } catch (err) {
    showError(String(err.message || err));
  } finally {
    $("search-btn").disabled = false;
  }
}

async function moreResults() {
  if (!state.lastSearch || !state.nextCursor) return;
  try {
    const data = await api("/v1/search", { ...state.lastSearch, cursor: state.nextCursor });
    renderHits(data, true);
  } catch (err) {
    showError(String(err.message || err));
  }
}

// -- ask (Server-Sent Events over fetch: EventSource cannot POST) -------------------------------------------

function linkCitations(text) {
  // "[2]" becomes a link to the second passage below the answer
  const out = [];
  let last = 0;
  for (const match of text.matchAll(/\[(\d+)\]/g)) {
    out.push(document.createTextNode(text.slice(last, match.index)));
    out.push(el("a", { class: "cite-inline", href: `#source-${match[1]}`, text: match[0] }));
    last = match.index + match[0].length;
  }
  out.push(document.createTextNode(text.slice(last)));
  return out;
}

function renderSources(passages) {
  $("sources-title").hidden = passages.length === 0;
  $("sources").replaceChildren(...passages.map((p) =>
    el("li", { id: `source-${p.n}` },
      el("strong", { text: `[${p.n}] ${p.title || p.doc_id}` }),
      el("span", { class: "src-text", text: p.text.length > 300 ? p.text.slice(0, 300) + "…" : p.text }))));
}

function renderCitations(citations) {
  $("citations-title").hidden = citations.length === 0;
  $("citations").replaceChildren(...citations.map((c) =>
    el("li", {}, el("a", {
      class: "citation",
      href: `/v1/documents/${encodeURIComponent(c.doc_id)}?collection=${encodeURIComponent(state.collection)}`,
      target: "_blank",
      text: `[${c.n}] ${c.title || c.doc_id}${c.inferred ? " (inferred)" : ""}`,
    }))));
}

async function ask(event) {
  event.preventDefault();
  const answer = $("answer");
  answer.replaceChildren();
  renderCitations([]);
  renderSources([]);
  $("answer-status").textContent = "retrieving…";
  $("ask-btn").disabled = true;
  let text = "";
  try {
    const response = await fetch("/v1/answer", {
      method: "POST",
      headers: headers(true),
      body: JSON.stringify({
        question: $("question").value, stream: true, collection: state.collection,
        mode: $("mode").value, rerank: $("rerank").checked,
      }),
    });
    if (!response.ok) {
      const data = await response.json().catch(() => ({}));
      throw new Error(`${response.status}: ${(data.error && data.error.message) || response.statusText}`);
    }
    answer.classList.add("streaming");
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
        const name = (block.match(/^event: (.*)$/m) || [])[1];
        const raw = (block.match(/^data: (.*)$/m) || [])[1];
        if (!name || raw === undefined) continue;
        const data = JSON.parse(raw);
        if (name === "passages") {
          renderSources(data.passages);
          $("answer-status").textContent = "generating…";
        } else if (name === "token") {
          text += data.text;
          answer.textContent = text;
        } else if (name === "done") {
          answer.replaceChildren(...linkCitations(data.answer));
          renderCitations(data.citations);
          const t = data.timings_ms;
          $("answer-status").textContent =
            `${data.answered ? "answered" : "declined"} by ${data.model} (${data.mode}) · build ${data.bundle} · ` +
            `generate ${t.generate.toFixed(0)} ms · total ${t.total.toFixed(0)} ms`;
        } else if (name === "error") {
          throw new Error(data.message);
        }
      }
    }
  } catch (err) {
    $("answer-status").textContent = `failed: ${err.message || err}`;
  } finally {
    answer.classList.remove("streaming");
    $("ask-btn").disabled = false;
  }
}

$("api-key").value = localStorage.getItem("sift-api-key") || "";
$("api-key").addEventListener("change", () => {
  localStorage.setItem("sift-api-key", $("api-key").value.trim());
  loadServed();
});
$("search-form").addEventListener("submit", runSearch);
$("more-btn").addEventListener("click", moreResults);
$("ask-form").addEventListener("submit", ask);
$("collection").addEventListener("change", describeCollection);
loadServed();
setInterval(refreshIngest, 5000);
