// The chat page: keeps the conversation and streams each answer from /v1/chat/completions (SSE over fetch).
"use strict";
const log = document.getElementById("log");
const statusLine = document.getElementById("status");
let modelName = null;
let messages = [];
let controller = null;

function addMessage(role, text) {
  const div = document.createElement("div");
  div.className = "msg " + role;
  div.textContent = text;
  log.appendChild(div);
  return div;
}

async function loadModel() {
  const reply = await fetch("/v1/models");
  const body = await reply.json();
  modelName = body.data[0].id;
  document.getElementById("model-name").textContent = modelName;
}

async function send(text) {
  messages.push({ role: "user", content: text });
  addMessage("user", text);
  const answer = addMessage("assistant", "");
  answer.id = "answer-" + messages.length;
  controller = new AbortController();
  document.getElementById("stop").disabled = false;
  document.getElementById("send").disabled = true;
  statusLine.textContent = "generating…";
  const started = performance.now();
  let tokens = 0;
  try {
    const reply = await fetch("/v1/chat/completions", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      signal: controller.signal,
      body: JSON.stringify({
        model: modelName,
        messages: messages,
        stream: true,
        temperature: parseFloat(document.getElementById("temperature").value),
        max_tokens: parseInt(document.getElementById("max-tokens").value, 10),
      }),
    });
    if (!reply.ok) {
      const body = await reply.json();
      throw new Error(body.error ? body.error.message : reply.statusText);
    }
    const reader = reply.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const event = buffer.slice(0, cut);
        buffer = buffer.slice(cut + 2);
        if (!event.startsWith("data: ")) continue;
        const data = event.slice(6);
        if (data === "[DONE]") continue;
        const chunk = JSON.parse(data);
        if (chunk.error) throw new Error(chunk.error.message);
        for (const choice of chunk.choices) {
          if (choice.delta && choice.delta.content) {
            answer.textContent += choice.delta.content;
            tokens += 1;
          }
          if (choice.finish_reason) answer.dataset.finish = choice.finish_reason;
        }
      }
    }
    messages.push({ role: "assistant", content: answer.textContent });
    const seconds = (performance.now() - started) / 1000;
    statusLine.textContent = `${tokens} chunks in ${seconds.toFixed(1)} s`;
  } catch (error) {
    if (error.name === "AbortError") {
      messages.push({ role: "assistant", content: answer.textContent });
      statusLine.textContent = "stopped";
    } else {
      messages.pop();
      answer.remove();
      addMessage("error", "error: " + error.message);
      statusLine.textContent = "";
    }
  } finally {
    answer.dataset.done = "1";
    controller = null;
    document.getElementById("stop").disabled = true;
    document.getElementById("send").disabled = false;
  }
}

document.getElementById("chat-form").addEventListener("submit", (event) => {
  event.preventDefault();
  const input = document.getElementById("prompt");
  const text = input.value.trim();
  if (!text || controller) return;
  input.value = "";
  send(text);
});
document.getElementById("stop").addEventListener("click", () => controller && controller.abort());
document.getElementById("clear").addEventListener("click", () => {
  messages = [];
  log.textContent = "";
});
loadModel().catch((error) => addMessage("error", "error: " + error.message));
