// Chat window for minigpt: an anywidget ES module that also runs in a static page.
//
// model.get("_data") is { title }; synced: transcript ([{role: "user" | "assistant" | "note",
// content}]) and busy. Live, a line typed in the box goes to Python (model.send({type: "say"}))
// and the reply streams back as transcript updates. In the static copy (model.get("static")) the
// transcript is the conversation recorded in the notebook and the box is off.
// el_, widgetRoot, adaptScheme and whenConnected come from prelude.js.

const CSS = `
.mgv-chat { max-width: 760px; }
.mgv-chat .mgv-log { border: 1px solid var(--mgv-line); border-radius: 6px; padding: 6px 8px; min-height: 3em;
  max-height: 360px; overflow-y: auto; margin-bottom: 8px; }
.mgv-chat .mgv-turn { margin: 3px 0; white-space: pre-wrap; word-break: break-word; }
.mgv-chat .mgv-who { font-weight: 600; margin-right: 6px; }
.mgv-chat .mgv-user .mgv-who { color: var(--mgv-muted); }
.mgv-chat .mgv-assistant .mgv-who { color: var(--mgv-accent); }
.mgv-chat .mgv-note { color: var(--mgv-muted); font-style: italic; }
.mgv-chat .mgv-row { display: flex; gap: 8px; }
.mgv-chat input[type=text] { flex: 1; font: inherit; color: inherit; background: transparent;
  border: 1px solid var(--mgv-line); border-radius: 4px; padding: 3px 6px; }
.mgv-chat button { font: inherit; color: inherit; background: transparent; border: 1px solid var(--mgv-line);
  border-radius: 4px; padding: 2px 10px; cursor: pointer; }
.mgv-chat button:disabled, .mgv-chat input:disabled { opacity: 0.45; cursor: default; }
.mgv-chat .mgv-hint { color: var(--mgv-muted); font-size: 12px; margin-top: 4px; }
`;

function render({ model, el }) {
  const data = model.get("_data");
  const live = !model.get("static");
  const root = widgetRoot("mgv-chat", CSS, data.title);
  const log = el_("div", { class: "mgv-log", "data-role": "log" });
  const box = el_("input", { type: "text", "data-role": "input", "aria-label": "your message",
    placeholder: live ? "Say something and press Enter" : "" });
  const send = el_("button", { type: "button", "data-role": "send", text: "Send" });
  const reset = el_("button", { type: "button", "data-role": "reset", text: "Reset" });
  const hint = el_("div", { class: "mgv-hint", "data-role": "hint", text: live
    ? "The model streams its reply token by token; Reset forgets the conversation."
    : "A recorded conversation. To chat live, run the notebook (Jupyter or Colab)." });
  root.append(log, el_("div", { class: "mgv-row" }, box, send, reset), hint);

  const say = () => {
    const text = box.value.trim();
    if (!live || !text || model.get("busy")) return;
    box.value = "";
    model.send({ type: "say", text });
  };
  send.addEventListener("click", say);
  box.addEventListener("keydown", (e) => { if (e.key === "Enter") say(); });
  reset.addEventListener("click", () => { if (live && !model.get("busy")) model.send({ type: "reset" }); });

  function update() {
    const turns = model.get("transcript") || [];
    log.replaceChildren(...turns.map((t) => {
      if (t.role === "note") return el_("div", { class: "mgv-turn mgv-note", text: `(${t.content})` });
      const who = t.role === "user" ? "you" : "assistant";
      return el_("div", { class: `mgv-turn mgv-${t.role}` }, el_("span", { class: "mgv-who", text: `${who}>` }),
        el_("span", { text: t.content }));
    }));
    log.dataset.turns = String(turns.length);
    log.scrollTop = log.scrollHeight;
    const off = !live || model.get("busy");
    box.disabled = send.disabled = reset.disabled = off;
  }

  model.on("change:transcript", update);
  model.on("change:busy", update);
  update();
  whenConnected(root, () => adaptScheme(root));
  el.replaceChildren(root);
  return () => { model.off("change:transcript", update); model.off("change:busy", update); };
}

export default { render };
