// phitune playground: a chat page over this server's own OpenAI-compatible API.
// No build step, no dependencies. The API key lives in the `apiKey` variable only
// (never in the URL, localStorage or a cookie); every text from the model or the
// server is inserted with textContent, never as HTML.
"use strict";

let apiKey = null;
let history = []; // [{role, content}] of the turns kept (a blocked prompt is not kept)
const $ = (id) => document.getElementById(id);

function el(tag, cls, text) {
  const node = document.createElement(tag);
  if (cls) node.className = cls;
  if (text !== undefined) node.textContent = text;
  return node;
}

async function api(path, options = {}) {
  const headers = { Authorization: `Bearer ${apiKey}`, ...(options.headers || {}) };
  return fetch(path, { ...options, headers });
}

// "401: Incorrect API key provided." from an OpenAI-style error response.
async function errorText(resp) {
  let message = resp.statusText;
  try {
    const body = await resp.json();
    message = (body.error && body.error.message) || message;
  } catch (e) { /* not JSON */ }
  return `${resp.status}: ${message}`;
}

async function connect(event) {
  event.preventDefault();
  const keyError = $("key-error");
  keyError.hidden = true;
  apiKey = $("api-key").value.trim();
  const resp = await api("v1/models");
  if (!resp.ok) {
    keyError.textContent = await errorText(resp);
    keyError.hidden = false;
    apiKey = null;
    return;
  }
  const models = (await resp.json()).data || [];
  const select = $("model");
  select.replaceChildren(...models.map((m) => {
    const option = el("option", null, m.version ? `${m.id} (version ${m.version})` : m.id);
    option.value = m.id;
    return option;
  }));
  $("api-key").value = ""; // the input is cleared; the key stays in memory
  $("connect").hidden = true;
  $("chat").hidden = false;
  $("status").textContent = `connected: ${models.length} model${models.length === 1 ? "" : "s"}`;
  $("prompt").focus();
}

function verdicts(results) {
  // Azure's content_filter_results: {category: {filtered, severity}}
  const box = el("div", "meta");
  for (const [category, r] of Object.entries(results || {})) {
    if (!r || typeof r.severity !== "string") continue;
    box.append(el("span", r.filtered ? "verdict filtered" : "verdict",
                  `${category}: ${r.severity}${r.filtered ? " (filtered)" : ""}`));
  }
  return box;
}

function addMessage(role, text) {
  const node = el("div", `message ${role}`);
  const body = el("div", "text", text);
  node.append(body);
  $("messages").append(node);
  node.scrollIntoView({ block: "end" });
  return { node, body };
}

function requestBody(messages) {
  return {
    model: $("model").value,
    messages,
    temperature: Number($("temperature").value),
    max_tokens: Number($("max-tokens").value) || undefined,
    stream: true,
    stream_options: { include_usage: true },
  };
}

// Server-sent events from a fetch body: yields each `data:` payload (a string).
async function* sseData(resp) {
  const reader = resp.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      for (const line of event.split("\n")) {
        if (line.startsWith("data: ")) yield line.slice(6);
      }
    }
  }
}

async function send(event) {
  event.preventDefault();
  const text = $("prompt").value;
  if (!text.trim() || !apiKey) return;
  $("prompt").value = "";
  $("send").disabled = true;
  const system = $("system").value.trim();
  const turn = { role: "user", content: text };
  const messages = [...(system ? [{ role: "system", content: system }] : []), ...history, turn];
  const user = addMessage("user", text);
  try {
    const resp = await api("v1/chat/completions", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify(requestBody(messages)),
    });
    if (!resp.ok) {
      addMessage("error", await errorText(resp)).node.classList.add("error");
      if (resp.status === 401) apiKey = null;
      return;
    }
    const answer = addMessage("assistant", "");
    const meta = el("div", "meta");
    let content = "", deltas = 0, finish = null, usage = null;
    for await (const data of sseData(resp)) {
      if (data === "[DONE]") break;
      const chunk = JSON.parse(data);
      if (chunk.error) {
        answer.node.append(el("div", "error", `error: ${chunk.error.message}`));
        break;
      }
      if (chunk.prompt_filter_results) {
        const prompt = verdicts(chunk.prompt_filter_results[0].content_filter_results);
        prompt.prepend(el("span", null, "prompt filter: "));
        user.node.append(prompt);
      }
      if (chunk.usage) usage = chunk.usage;
      const choice = (chunk.choices || [])[0];
      if (!choice) continue;
      if (choice.delta && choice.delta.content) {
        content += choice.delta.content;
        deltas += 1;
        answer.body.textContent = content;
        answer.node.dataset.deltas = String(deltas);
      }
      if (choice.finish_reason) {
        finish = choice.finish_reason;
        if (choice.content_filter_results) {
          const completion = verdicts(choice.content_filter_results);
          completion.prepend(el("span", null, "completion filter: "));
          answer.node.append(completion);
        }
      }
    }
    const parts = [`finish: ${finish || "incomplete"}`];
    if (usage) {
      parts.push(`usage: ${usage.prompt_tokens} prompt + ${usage.completion_tokens} completion = ` +
                 `${usage.total_tokens} tokens`);
    }
    meta.textContent = parts.join(" · ");
    meta.classList.add("usage");
    answer.node.append(meta);
    answer.node.dataset.finish = finish || "";
    if (finish === "stop" || finish === "length") {
      history.push(turn, { role: "assistant", content });
    }
  } catch (e) {
    addMessage("error", `the request failed: ${e.message}`).node.classList.add("error");
  } finally {
    $("send").disabled = false;
  }
}

document.addEventListener("DOMContentLoaded", () => {
  $("key-form").addEventListener("submit", connect);
  $("send-form").addEventListener("submit", send);
  $("prompt").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey) {
      e.preventDefault();
      $("send-form").requestSubmit();
    }
  });
  $("temperature").addEventListener("input", () => { $("temperature-value").textContent = $("temperature").value; });
  $("clear").addEventListener("click", () => { history = []; $("messages").replaceChildren(); });
});
