// Sampling explorer for minigpt: an anywidget ES module that also runs in a static page.
//
// model.get("_data") is the payload of minigpt.viz.sampling.SamplingExplorer:
//   { title, n_top, labels: {id: label}, prompt, prompt_cut,
//     pieces: [text of each sampled token] | null, trace: {temperature, top_k, ...} | null,
//     steps: [{ logits: base64 float32, the whole row in token-id order, chosen: id | null }] }
// Synced: temperature (0 = greedy), top_k (0 = off), top_p (1 = off), min_p (0 = off), step.
// The n_top most likely tokens get a bar each, the rest one "other" bar.
//
// filterStep is the JavaScript twin of minigpt.generate.next_token_probs (temperature, top-k
// with ties kept, top-p, min-p; the repetition penalty is already in a trace's logits), applied
// to the whole row, so the numbers are the sampler's; the browser tests compare the two.
// el_, widgetRoot, bytesFromBase64, adaptScheme and whenConnected come from prelude.js.

const CSS = `
.mgv-samp {
  --mgv-mark: var(--jp-warn-color1, var(--pst-color-warning, #d9822b));
  --mgv-off: color-mix(in srgb, currentColor 22%, transparent);
  max-width: 760px;
}
.mgv-samp .mgv-context { white-space: pre-wrap; word-break: break-word; border: 1px solid var(--mgv-line);
  border-radius: 6px; padding: 6px 8px; margin-bottom: 8px; max-height: 7.5em; overflow-y: auto; }
.mgv-samp .mgv-prompt { color: var(--mgv-muted); }
.mgv-samp .mgv-now { outline: 2px solid var(--mgv-mark); border-radius: 3px; padding: 0 1px; font-weight: 700; }
.mgv-samp .mgv-next { border: 1px dashed var(--mgv-muted); border-radius: 3px; padding: 0 4px; color: var(--mgv-muted); }
.mgv-samp .mgv-nav { display: flex; flex-wrap: wrap; gap: 6px 10px; align-items: center; margin-bottom: 8px; }
.mgv-samp button { font: inherit; color: inherit; background: transparent; border: 1px solid var(--mgv-line);
  border-radius: 4px; padding: 2px 10px; cursor: pointer; }
.mgv-samp button:hover:not(:disabled) { border-color: var(--mgv-accent); }
.mgv-samp button:disabled { opacity: 0.45; cursor: default; }
.mgv-samp .mgv-sliders { display: grid; grid-template-columns: max-content minmax(120px, 260px) 5.5em 1fr;
  gap: 3px 10px; align-items: center; margin-bottom: 8px; }
.mgv-samp .mgv-sliders input[type=range] { width: 100%; accent-color: var(--mgv-accent); margin: 0; }
.mgv-samp .mgv-val { font-variant-numeric: tabular-nums; }
.mgv-samp .mgv-hint { color: var(--mgv-muted); font-size: 12px; }
.mgv-samp .mgv-summary { margin: 4px 0 6px; }
.mgv-samp .mgv-summary b { font-variant-numeric: tabular-nums; }
.mgv-samp .mgv-legend { color: var(--mgv-muted); font-size: 12px; margin-bottom: 4px; display: flex; gap: 14px; flex-wrap: wrap; }
.mgv-samp .mgv-swatch { display: inline-block; width: 14px; height: 9px; vertical-align: middle; margin-right: 4px; border-radius: 2px; }
.mgv-samp .mgv-bars { max-height: 440px; overflow-y: auto; border-top: 1px solid var(--mgv-line); padding-top: 4px;
  display: grid; grid-template-columns: auto minmax(2em, max-content) minmax(160px, 1fr) auto;
  column-gap: 8px; row-gap: 2px; align-items: center; }
.mgv-samp .mgv-row { display: contents; }
.mgv-samp .mgv-rank { color: var(--mgv-muted); font-size: 11px; text-align: right; font-variant-numeric: tabular-nums; min-width: 2.2em; }
.mgv-samp .mgv-label { text-align: right; white-space: pre; overflow: hidden; text-overflow: ellipsis; max-width: 14em; line-height: 17px; }
.mgv-samp .mgv-track { position: relative; height: 13px; }
.mgv-samp .mgv-ghost { position: absolute; left: 0; top: 0; height: 100%; border: 1px solid var(--mgv-muted);
  border-radius: 2px; box-sizing: border-box; opacity: 0.75; }
.mgv-samp .mgv-row[data-kept="0"] .mgv-ghost { border: none; background: var(--mgv-off); opacity: 1; }
.mgv-samp .mgv-bar { position: absolute; left: 0; top: 2px; height: 9px; border-radius: 2px; background: var(--mgv-accent); }
.mgv-samp .mgv-row[data-kept="0"] .mgv-label { color: var(--mgv-muted); text-decoration: line-through; text-decoration-color: var(--mgv-muted); }
.mgv-samp .mgv-row[data-kept="0"] .mgv-num { color: var(--mgv-muted); }
.mgv-samp .mgv-row.mgv-chosen .mgv-label { color: var(--mgv-mark); font-weight: 700; text-decoration: none; }
.mgv-samp .mgv-row.mgv-chosen .mgv-rank::before { content: "\u25b6 "; color: var(--mgv-mark); }
.mgv-samp .mgv-row.mgv-other .mgv-label { font-style: italic; font-family: inherit; }
.mgv-samp .mgv-num { text-align: right; font-variant-numeric: tabular-nums; font-size: 12px; min-width: 4.2em; }
`;

function f32FromBase64(b64) {
  const view = new DataView(bytesFromBase64(b64).buffer);
  const out = new Float64Array(view.byteLength / 4);
  for (let i = 0; i < out.length; i++) out[i] = view.getFloat32(4 * i, true);
  return out;
}

// Token ids by logit, most likely first, ties by id: the filters keep a prefix of this order
// (temperature > 0 does not change it), and greedy's argmax is its first token.
function rankOrder(logit) {
  return Int32Array.from(logit, (_, i) => i).sort((a, b) => logit[b] - logit[a] || a - b);
}

// exp(z - logsumexp) over the first n tokens of `order`; the rest get 0.
function softmaxPrefix(z, order, n) {
  const out = new Float64Array(z.length);
  const top = z[order[0]];
  let sum = 0;
  for (let r = 0; r < n; r++) sum += Math.exp(z[order[r]] - top);
  const lse = top + Math.log(sum);
  for (let r = 0; r < n; r++) out[order[r]] = Math.exp(z[order[r]] - lse);
  return out;
}

// The distribution of one step: probabilities by token id, and nKeep, how many tokens of
// `order` survive the filters (always a prefix of it).
export function filterStep(logit, order, settings) {
  const V = logit.length;
  const T = settings.temperature;
  const modelProbs = softmaxPrefix(logit, order, V);
  if (T === 0) { // greedy: the argmax (lowest id among ties) gets everything
    const probs = new Float64Array(V);
    probs[order[0]] = 1;
    return { probs, nKeep: 1, entropy: 0, modelProbs };
  }
  const z = logit.map((v) => v / T);
  let n = V;
  const k = settings.top_k | 0;
  if (k > 0 && k < V) { // top-k, ties with the k-th kept
    n = k;
    while (n < V && z[order[n]] >= z[order[k - 1]]) n++;
  }
  if (settings.top_p < 1) { // top-p: remove a token once the more likely ones reach p
    const probs = softmaxPrefix(z, order, n);
    let before = 0;
    let kept = 0;
    while (kept < n && before < settings.top_p) before += probs[order[kept++]];
    n = kept;
  }
  if (settings.min_p > 0) { // min-p: keep p >= min_p * the top probability
    const probs = softmaxPrefix(z, order, n);
    const threshold = settings.min_p * probs[order[0]];
    let kept = 0;
    while (kept < n && probs[order[kept]] >= threshold) kept++;
    n = kept;
  }
  const probs = softmaxPrefix(z, order, n);
  let entropy = 0;
  for (let r = 0; r < n; r++) {
    const q = probs[order[r]];
    if (q > 0) entropy -= q * Math.log(q);
  }
  return { probs, nKeep: n, entropy, modelProbs };
}

function pct(x) {
  if (x === 0) return "0";
  if (x >= 0.001) return (100 * x).toFixed(x >= 0.1 ? 1 : 2) + "%";
  return (100 * x).toExponential(1) + "%";
}

const SLIDERS = [
  { name: "temperature", label: "temperature", min: 0, max: 2, step: 0.05,
    show: (v) => (v === 0 ? "0 greedy" : v.toFixed(2)), hint: "divide logits by T: < 1 sharpens, > 1 flattens" },
  { name: "top_k", label: "top-k", min: 0, max: 50, step: 1,
    show: (v) => (v === 0 ? "off" : String(v)), hint: "keep the k most likely (ties kept)" },
  { name: "top_p", label: "top-p", min: 0.01, max: 1, step: 0.01,
    show: (v) => (v >= 1 ? "off" : v.toFixed(2)), hint: "keep the smallest set with mass \u2265 p" },
  { name: "min_p", label: "min-p", min: 0, max: 1, step: 0.01,
    show: (v) => (v <= 0 ? "off" : v.toFixed(2)), hint: "keep p \u2265 min-p \u00d7 top probability" },
];

// One step of the payload, decoded and ranked; chosenRank is the drawn token's place in `order`.
function prepareStep({ logits, chosen }) {
  const logit = f32FromBase64(logits);
  const order = rankOrder(logit);
  return { logit, order, chosen, chosenRank: chosen === null ? -1 : order.indexOf(chosen) };
}

function render({ model, el }) {
  const data = model.get("_data");
  const S = data.steps.length;
  const prepared = []; // a step is decoded and sorted when first shown, not all at load
  const stepAt = (i) => (prepared[i] ??= prepareStep(data.steps[i]));
  const label = (id) => data.labels[String(id)] ?? String(id);
  const isTrace = !!data.pieces;

  const root = widgetRoot("mgv-samp", CSS, data.title);
  const context = el_("div", { class: "mgv-context mgv-mono", "data-role": "context" });
  root.append(context);

  // Trace navigation.
  const prev = el_("button", { type: "button", "data-role": "prev", title: "previous token (\u2190)", text: "\u25c0 prev" });
  const next = el_("button", { type: "button", "data-role": "next", title: "next token (\u2192)", text: "next \u25b6" });
  const stepText = el_("span", { "data-role": "step-text" });
  const chosenText = el_("span", { "data-role": "chosen" });
  const reset = el_("button", { type: "button", "data-role": "reset" });
  if (isTrace) {
    const t = data.trace || {};
    const bits = [`T=${t.temperature}`];
    if (t.top_k) bits.push(`top-k ${t.top_k}`);
    if (t.top_p < 1) bits.push(`top-p ${t.top_p}`);
    if (t.min_p > 0) bits.push(`min-p ${t.min_p}`);
    if (t.repetition_penalty && t.repetition_penalty !== 1) bits.push(`repetition penalty ${t.repetition_penalty}`);
    reset.textContent = "\u21ba sampler's settings";
    reset.title = `back to the settings the trace was sampled with (${bits.join(", ")}, seed ${t.seed})`;
    root.append(el_("div", { class: "mgv-nav" }, prev, stepText, next, chosenText, reset));
  }

  // Sliders.
  const sliders = {};
  const sliderBox = el_("div", { class: "mgv-sliders" });
  for (const s of SLIDERS) {
    const max = s.name === "top_k" ? data.n_top : s.max;
    const input = el_("input", { type: "range", min: String(s.min), max: String(max), step: String(s.step),
      "data-role": s.name, "aria-label": s.label });
    const out = el_("span", { class: "mgv-val mgv-mono" });
    input.addEventListener("input", () => {
      let v = s.name === "top_k" ? parseInt(input.value, 10) : parseFloat(input.value);
      model.set(s.name, v);
      model.save_changes();
    });
    sliders[s.name] = { input, out, spec: s };
    sliderBox.append(el_("label", { text: s.label }), input, out, el_("span", { class: "mgv-hint", text: s.hint }));
  }
  root.append(sliderBox);
  const summary = el_("div", { class: "mgv-summary", "data-role": "summary" });
  root.append(summary);
  root.append(el_("div", { class: "mgv-legend" },
    el_("span", {}, el_("span", { class: "mgv-swatch", style: "background: var(--mgv-accent)" }), "after temperature and filters"),
    el_("span", {}, el_("span", { class: "mgv-swatch", style: "border: 1px solid var(--mgv-muted)" }), "the model's own (T=1, no filter)"),
    el_("span", {}, el_("span", { class: "mgv-swatch", style: "background: var(--mgv-off)" }), "removed (the model's own)"),
  ));
  const bars = el_("div", { class: "mgv-bars", "data-role": "bars" });
  root.append(bars);
  el.replaceChildren(root);

  prev.addEventListener("click", () => { model.set("step", Math.max(0, (model.get("step") | 0) - 1)); model.save_changes(); });
  next.addEventListener("click", () => { model.set("step", Math.min(S - 1, (model.get("step") | 0) + 1)); model.save_changes(); });
  reset.addEventListener("click", () => {
    for (const name of ["temperature", "top_k", "top_p", "min_p"]) model.set(name, data.trace[name]);
    model.save_changes();
  });
  root.addEventListener("keydown", (e) => {
    if (!isTrace || e.target.tagName === "INPUT") return;
    if (e.key === "ArrowLeft") prev.click();
    else if (e.key === "ArrowRight") next.click();
  });

  function drawContext(step) {
    const parts = [];
    parts.push(el_("span", { class: "mgv-prompt", text: (data.prompt_cut ? "\u2026" : "") + data.prompt }));
    if (isTrace) {
      parts.push(el_("span", { text: data.pieces.slice(0, step).join("") }));
      const piece = data.pieces[step];
      // A blank piece (a space, a newline) would be an empty box: show its visible label instead.
      const shown = /^\s*$/.test(piece) ? label(data.steps[step].chosen) : piece;
      parts.push(el_("span", { class: "mgv-now", title: `token sampled at step ${step + 1}`, text: shown }));
    } else {
      parts.push(el_("span", { class: "mgv-next", text: "?" }));
    }
    context.replaceChildren(...parts);
    const now = context.querySelector(".mgv-now, .mgv-next");
    if (now && context.scrollHeight > context.clientHeight) context.scrollTop = context.scrollHeight;
  }

  function row(rank, id, name, prob, modelProb, kept, scale, extraClass) {
    const tip = `${name}${typeof id === "number" ? ` (id ${id})` : ""}: model ${pct(modelProb)}, ` +
      (kept ? `after temperature and filters ${pct(prob)}` : "removed by the filters");
    const track = el_("div", { class: "mgv-track", title: tip });
    const ghostW = (100 * modelProb) / scale;
    if (ghostW >= 0.4) { // thinner than that, an outline would read as a "|" glyph
      const ghost = el_("div", { class: "mgv-ghost" });
      ghost.style.width = `${ghostW}%`;
      track.append(ghost);
    }
    if (kept) {
      const bar = el_("div", { class: "mgv-bar" });
      bar.style.width = `${(100 * prob) / scale}%`;
      track.append(bar);
    }
    const num = kept ? pct(prob) : "\u2013";
    return el_("div", { class: "mgv-row" + (extraClass ? " " + extraClass : ""),
      "data-token-id": String(id), "data-prob": prob.toPrecision(10), "data-model-prob": modelProb.toPrecision(10),
      "data-kept": kept ? "1" : "0", "data-rank": String(rank) },
      el_("span", { class: "mgv-rank", text: typeof rank === "number" ? String(rank + 1) : "" }),
      el_("span", { class: "mgv-label mgv-mono", text: name, title: tip }), track,
      el_("span", { class: "mgv-num", text: num, title: tip }));
  }

  function update() {
    const step = Math.min(S - 1, Math.max(0, model.get("step") | 0));
    const settings = {
      temperature: +model.get("temperature"), top_k: model.get("top_k") | 0,
      top_p: +model.get("top_p"), min_p: +model.get("min_p"),
    };
    for (const [name, { input, out, spec }] of Object.entries(sliders)) {
      input.value = String(settings[name]);
      out.textContent = spec.show(settings[name]);
    }
    const st = stepAt(step);
    const f = filterStep(st.logit, st.order, settings);
    const V = st.logit.length;
    const n = Math.min(data.n_top, V); // bars of their own; the rest share the "other" bar
    let other = 0;
    let modelOther = 0;
    for (let r = n; r < V; r++) {
      other += f.probs[st.order[r]];
      modelOther += f.modelProbs[st.order[r]];
    }
    let scale = Math.max(1e-12, other, modelOther);
    for (let r = 0; r < n; r++) scale = Math.max(scale, f.probs[st.order[r]], f.modelProbs[st.order[r]]);
    const rows = Array.from(st.order.subarray(0, n), (id, r) => row(r, id, label(id), f.probs[id],
      f.modelProbs[id], r < f.nKeep, scale, id === st.chosen ? "mgv-chosen" : ""));
    if (n < V) rows.push(row("", "other", `other (${V - n})`, other, modelOther, f.nKeep > n, scale, "mgv-other"));
    bars.replaceChildren(...rows);
    bars.dataset.step = String(step);
    bars.dataset.entropy = f.entropy.toPrecision(10);
    bars.dataset.keptCount = String(f.nKeep);

    const rest = n < V ? ` (+ ${f.nKeep > n ? pct(other) : "none"} from the ${V - n} others)` : "";
    summary.replaceChildren(
      "kept ", el_("b", { text: String(f.nKeep) }), ` of ${V} tokens${rest} \u00b7 entropy `,
      el_("b", { "data-role": "entropy", text: f.entropy.toFixed(3) }), " nats");

    if (isTrace) {
      stepText.textContent = `token ${step + 1} of ${S}`;
      prev.disabled = step === 0;
      next.disabled = step === S - 1;
      const where = `rank ${st.chosenRank + 1}${st.chosenRank < n ? "" : ", among the others"}`;
      chosenText.replaceChildren("sampled ", el_("b", { class: "mgv-mono", text: label(st.chosen) }),
        ` (${where}${st.chosenRank < f.nKeep ? "" : "; removed by the current settings"})`);
    }
    drawContext(step);
  }

  const names = ["temperature", "top_k", "top_p", "min_p", "step"];
  for (const n of names) model.on(`change:${n}`, update);
  update();
  whenConnected(root, () => adaptScheme(root));
  return () => { for (const n of names) model.off(`change:${n}`, update); };
}

export default { render };
