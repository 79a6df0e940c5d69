// Streams a chat completion from the console's session-authenticated endpoint and shows the
// tokens as they arrive. The stream is OpenAI's chat.completion.chunk SSE format.
(function () {
  const form = document.getElementById("chat-form");
  const transcript = document.getElementById("transcript");
  const errorBox = document.getElementById("chat-error");
  const where = document.getElementById("where");
  const messages = [];

  // The request body: the model (or adapter), the conversation and the sampling settings that are set.
  function settings() {
    const body = { model: form.model.value, messages: messages,
                   temperature: parseFloat(form.temperature.value), max_tokens: parseInt(form.max_tokens.value, 10) };
    if (form.top_p.value !== "") body.top_p = parseFloat(form.top_p.value);
    if (form.seed.value !== "") body.seed = parseInt(form.seed.value, 10);
    return body;
  }

  // Where the answer ran and under which policy: a server-rendered fragment for the job behind the stream.
  async function showWhere(completionId) {
    const hex = completionId.replace(/^chatcmpl-/, "");
    if (!/^[0-9a-f]{32}$/.test(hex)) return;
    const uuid = [hex.slice(0, 8), hex.slice(8, 12), hex.slice(12, 16), hex.slice(16, 20), hex.slice(20)].join("-");
    const response = await fetch(form.dataset.jobUrl.replace("00000000-0000-0000-0000-000000000000", uuid));
    if (!response.ok) return;
    where.innerHTML = await response.text();
    where.hidden = false;
  }

  function bubble(role, text) {
    const div = document.createElement("div");
    div.className = "msg " + role;
    div.dataset.role = role;
    div.textContent = text;
    transcript.appendChild(div);
    return div;
  }

  async function send(event) {
    event.preventDefault();
    errorBox.hidden = true;
    const content = form.message.value.trim();
    if (!content) return;
    messages.push({ role: "user", content: content });
    bubble("user", content);
    form.message.value = "";
    const out = bubble("assistant", "");
    form.send.disabled = true;
    try {
      const response = await fetch(form.dataset.streamUrl, {
        method: "POST",
        headers: { "Content-Type": "application/json", "X-CSRFToken": form.csrfmiddlewaretoken.value },
        body: JSON.stringify(settings()),
      });
      if (!response.ok) {
        const body = await response.json().catch(() => ({}));
        throw new Error((body.error && body.error.message) || body.detail || response.statusText);
      }
      const reader = response.body.getReader();
      const decoder = new TextDecoder();
      let buffer = "";
      let completionId = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer += decoder.decode(value, { stream: true });
        let cut;
        while ((cut = buffer.indexOf("\n\n")) >= 0) {
          const line = buffer.slice(0, cut).replace(/^data: /, "");
          buffer = buffer.slice(cut + 2);
          if (line === "[DONE]") { out.dataset.done = "true"; continue; }
          const data = JSON.parse(line);
          if (data.error) throw new Error(data.error.message);
          if (data.id) completionId = data.id;
          const delta = data.choices && data.choices[0] && data.choices[0].delta;
          if (delta && delta.content) out.textContent += delta.content;
        }
      }
      messages.push({ role: "assistant", content: out.textContent });
      if (completionId) await showWhere(completionId);
    } catch (err) {
      errorBox.textContent = "Error: " + err.message;
      errorBox.hidden = false;
      messages.pop();
    } finally {
      form.send.disabled = false;
    }
  }
  form.addEventListener("submit", send);
})();
