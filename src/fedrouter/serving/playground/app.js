// The FedRouter playground: a chat that streams from /v1/chat/completions and shows how each answer was routed.
"use strict";

const $ = (id) => document.getElementById(id);
let history = [];
let names = {}; // adapter id -> its cluster's readable name (from /v1/models); every name is shown as text, never as HTML

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("api-key").value.trim();
  if (key) h.Authorization = "Bearer " + key;
  return h;
}

async function loadModels() {
  const response = await fetch("/v1/models", { headers: headers() });
  if (!response.ok) {
    $("status").textContent = "cannot list models: " + (await errorText(response));
    return;
  }
  const select = $("model");
  select.replaceChildren();
  names = {};
  for (const model of (await response.json()).data) {
    const option = document.createElement("option");
    option.value = model.id;
    if (model.routing === "cluster") {
      names[model.id] = model.description || model.id;
      option.textContent = model.id === names[model.id] ? model.id : model.id + " · " + names[model.id];
    } else {
      option.textContent = model.id + " (" + model.routing + ")";
    }
    select.append(option);
  }
  $("status").textContent = "";
}

async function errorText(response) {
  try {
    return (await response.json()).error.message;
  } catch {
    return response.status + " " + response.statusText;
  }
}

function addTurn(kind, text) {
  const div = document.createElement("div");
  div.className = "turn " + kind;
  div.textContent = text;
  $("chat").append(div);
  div.scrollIntoView({ block: "end" });
  return div;
}

// The label of an adapter: its id, and its cluster's name where that says more.
function label(id, name) {
  return !name || name === id ? id : id + " · " + name;
}

// Nearness of each cluster: the nearest distance divided by this one, so the nearest bar is full and a cluster
// twice as far gets half a bar (two near-equal bars: the prompt sat between two clusters).
function nearness(distances) {
  const nearest = Math.min(...distances);
  return distances.map((d) => (d > 0 ? nearest / d : 1));
}

function showRoute(turn, info) {
  const box = document.createElement("div");
  box.className = "route";
  const distance = info.distance === null ? "" : ", distance " + info.distance.toFixed(3);
  box.innerHTML = "served by <span class='adapter'></span> (" + info.routing + " routing" + distance + ")";
  box.querySelector(".adapter").textContent = label(info.adapter, info.name);
  if (info.distances.length) {
    const bars = document.createElement("div");
    bars.className = "bars";
    const heads = ["adapter", "nearness (longest bar: nearest cluster)", "distance"].map((text) => {
      const head = document.createElement("span");
      head.className = "head";
      head.textContent = text;
      return head;
    });
    bars.append(...heads);
    const near = nearness(info.distances);
    const nearest = info.distances.indexOf(Math.min(...info.distances));
    info.distances.forEach((d, g) => {
      const id = "cluster_" + g;
      const name = document.createElement("span");
      name.className = "name";
      name.textContent = label(id, names[id]);
      name.title = name.textContent;
      const bar = document.createElement("div");
      bar.className = "bar";
      bar.title = "nearest distance / this distance = " + near[g].toFixed(3);
      const fill = document.createElement("span");
      fill.style.width = (100 * near[g]).toFixed(1) + "%";
      bar.append(fill);
      const value = document.createElement("span");
      value.textContent = d.toFixed(3);
      const row = [name, bar, value];
      if (g === nearest) row.forEach((el) => el.classList.add("nearest"));
      if (info.adapter === id) row.forEach((el) => el.classList.add("chosen"));
      bars.append(...row);
    });
    box.append(bars);
  }
  turn.append(box);
}

async function send(text) {
  history.push({ role: "user", content: text });
  addTurn("user", text);
  const turn = addTurn("assistant", "");
  const answer = document.createElement("span");
  turn.append(answer);
  const system = $("system").value.trim();
  const body = {
    model: $("model").value,
    messages: system ? [{ role: "system", content: system }, ...history] : history,
    max_tokens: Number($("max-tokens").value) || 64,
    temperature: Number($("temperature").value) || 0,
    stream: true,
  };
  $("send").disabled = true;
  $("status").textContent = "answering…";
  try {
    const response = await fetch("/v1/chat/completions", { method: "POST", headers: headers(), body: JSON.stringify(body) });
    if (!response.ok) throw new Error(await errorText(response));
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const event = buffer.slice(0, end).replace(/^data: /, "");
        buffer = buffer.slice(end + 2);
        if (event === "[DONE]") continue;
        const chunk = JSON.parse(event);
        if (chunk.error) throw new Error(chunk.error.message);
        const delta = chunk.choices.length ? chunk.choices[0].delta : {};
        if (delta.content) answer.textContent += delta.content;
        if (chunk.fedrouter) showRoute(turn, chunk.fedrouter);
      }
    }
    history.push({ role: "assistant", content: answer.textContent });
    $("status").textContent = "";
  } catch (err) {
    history.pop();
    turn.classList.add("error");
    answer.textContent = "Error: " + err.message;
    $("status").textContent = "";
  } finally {
    $("send").disabled = false;
  }
}

$("ask").addEventListener("submit", (event) => {
  event.preventDefault();
  const text = $("prompt").value.trim();
  if (!text) return;
  $("prompt").value = "";
  send(text);
});
$("prompt").addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey) {
    event.preventDefault();
    $("ask").requestSubmit();
  }
});
$("clear").addEventListener("click", () => {
  history = [];
  $("chat").replaceChildren();
});
$("api-key").addEventListener("change", loadModels);
loadModels();
