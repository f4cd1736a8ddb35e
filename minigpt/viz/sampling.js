// Sampling explorer for minigpt: an anywidget ES module that also runs in a static page.
//
// model.get("_data") is the payload of minigpt.viz.sampling.SamplingExplorer:
//   { title, V, n_top, labels: {id: label}, prompt, prompt_cut,
//     pieces: [text of each sampled token] | null, trace: {temperature, top_k, ...} | null,
//     steps: [{ ids, logits: base64 float32, tail: null | {count, max, min, lse[], mean[]},
//               chosen, chosen_rank }] }   (tail.lse[i], tail.mean[i] are at temperature tail.temps[i])
// Synced: temperature (0 = greedy), top_k (0 = off), top_p (1 = off), min_p (0 = off), step.
//
// filterStep mirrors minigpt.generate.next_token_probs (temperature, top-k with ties kept,
// top-p, min-p; the repetition penalty is already in a trace's logits) and, line for line,
// minigpt.viz.sampling.filtered_distribution, whose docstring says when "other" (the tokens
// not shipped) makes the numbers approximate.

const CSS = `
.mgv-samp {
  /* Colours follow the host: the text colour is inherited (JupyterLab, VS Code, Colab, a book
     page, or a dark page's light output panel alike) and greys are mixed from it; the accent is
     the host's brand colour where it has one. */
  --mgv-accent: var(--jp-brand-color1, var(--pst-color-primary, var(--vscode-textLink-foreground, #2f6fd0)));
  --mgv-muted: color-mix(in srgb, currentColor 62%, transparent);
  --mgv-line: color-mix(in srgb, currentColor 24%, transparent);
  --mgv-mark: var(--jp-warn-color1, var(--pst-color-warning, #d9822b));
  --mgv-off: color-mix(in srgb, currentColor 22%, transparent);
  color: inherit;
  font-family: system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif;
  font-size: 13px; line-height: 1.35; padding: 6px 2px; max-width: 760px;
}
.mgv-samp .mgv-mono { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, "Liberation Mono", monospace; }
.mgv-samp .mgv-title { font-weight: 600; margin: 0 0 6px; }
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
.mgv-samp .mgv-approx { color: var(--mgv-mark); }
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

function el_(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") node.className = v;
    else if (k === "text") node.textContent = v;
    else node.setAttribute(k, v);
  }
  for (const c of children) node.append(c);
  return node;
}

function f32FromBase64(b64) {
  const bin = atob(b64);
  const bytes = new Uint8Array(bin.length);
  for (let i = 0; i < bin.length; i++) bytes[i] = bin.charCodeAt(i);
  const view = new DataView(bytes.buffer);
  const out = new Float64Array(bytes.length / 4);
  for (let i = 0; i < out.length; i++) out[i] = view.getFloat32(4 * i, true);
  return out;
}

function logSumExp(values) {
  let m = -Infinity;
  for (const v of values) if (v > m) m = v;
  if (m === -Infinity) return m;
  let s = 0;
  for (const v of values) s += Math.exp(v - m);
  return m + Math.log(s);
}

function gridIndex(grid, t) {
  return grid.findIndex((g) => Math.abs(g - t) < 1e-9);
}

function nearest(grid, t) {
  let best = 0;
  grid.forEach((g, i) => { if (Math.abs(g - t) < Math.abs(grid[best] - t)) best = i; });
  return best;
}

// The filtered distribution of one step. `logit` is the shipped logits, most likely first.
export function filterStep(logit, tail, settings) {
  const grid = tail ? tail.temps : [1.0];
  const N = logit.length;
  const T = settings.temperature;
  const k = settings.top_k | 0;
  const p = settings.top_p;
  const minP = settings.min_p;
  const g1 = gridIndex(grid, 1.0);
  const z1 = logSumExp([...logit, ...(tail ? [tail.lse[g1]] : [])]);
  const modelProbs = Array.from(logit, (v) => Math.exp(v - z1));
  const modelOther = tail ? Math.exp(tail.lse[g1] - z1) : 0;
  const probs = new Float64Array(N);
  if (T === 0) { // greedy: the argmax (lowest id among ties) gets everything
    probs[0] = 1;
    return { probs, nKeep: 1, other: 0, otherKept: false, exact: true, entropy: 0, modelProbs, modelOther };
  }
  let exact = true;
  let gi = gridIndex(grid, T);
  if (gi < 0) { // off the grid (never from the slider): the nearest summary, flagged
    gi = nearest(grid, T);
    exact = !tail;
  }
  const z = Array.from(logit, (v) => v / T);
  let nKeep = N; // the kept shipped tokens are always a prefix
  let tailKept = !!tail;
  const tailLse = tail ? tail.lse[gi] : -Infinity;
  const tMax = tail ? tail.max / T : -Infinity;
  const tMin = tail ? tail.min / T : -Infinity;
  const norm = () => logSumExp([...z.slice(0, nKeep), ...(tailKept ? [tailLse] : [])]);

  if (k > 0) { // top-k, ties with the k-th kept
    const kk = Math.min(k, N + (tail ? tail.count : 0));
    if (kk <= N) {
      const kth = z[kk - 1];
      nKeep = z.filter((v) => v >= kth).length;
      if (tailKept) {
        if (tMin >= kth) { /* every other token ties with the k-th: all kept */ }
        else if (tMax >= kth) exact = false;
        else tailKept = false;
      }
    } else {
      exact = false;
    }
  }
  if (p < 1) { // top-p: remove a token once the more likely ones reach p
    const Z = norm();
    let before = 0;
    let newKeep = 0;
    for (let i = 0; i < nKeep; i++) {
      if (before >= p) break;
      newKeep = i + 1;
      before += Math.exp(z[i] - Z);
    }
    nKeep = newKeep;
    if (tailKept) {
      if (before >= p) tailKept = false;
      else if (!(1 - Math.exp(tMin - Z) < p)) exact = false;
    }
  }
  if (minP > 0) { // min-p: keep p_i >= min_p * p_max
    const Z = norm();
    const threshold = minP * Math.exp(z[0] - Z);
    let count = 0;
    for (let i = 0; i < nKeep; i++) if (Math.exp(z[i] - Z) >= threshold) count++;
    nKeep = count;
    if (tailKept) {
      if (Math.exp(tMax - Z) < threshold) tailKept = false;
      else if (Math.exp(tMin - Z) < threshold) exact = false;
    }
  }
  const Z = norm();
  let entropy = 0;
  for (let i = 0; i < nKeep; i++) {
    probs[i] = Math.exp(z[i] - Z);
    entropy -= probs[i] * (z[i] - Z);
  }
  const other = tailKept ? Math.exp(tailLse - Z) : 0;
  if (tailKept) entropy += other * (Z - tail.mean[gi]);
  return { probs, nKeep, other, otherKept: tailKept, exact, entropy, modelProbs, modelOther };
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

// Native controls (selects, sliders, checkboxes) follow `color-scheme`. Derive it from the text
// colour we inherit, which is right even where a dark page puts outputs on a light panel.
function adaptScheme(root) {
  const m = getComputedStyle(root).color.match(/[\d.]+/g);
  if (!m || m.length < 3) return;
  const [r, g, b] = m.slice(0, 3).map(Number);
  root.style.colorScheme = 0.2126 * r + 0.7152 * g + 0.0722 * b > 128 ? "dark" : "light";
}

// Run `fn` once `node` is in the document (anywidget may render before attaching the view).
function whenConnected(node, fn, tries = 600) {
  if (node.isConnected) fn();
  else if (tries > 0) requestAnimationFrame(() => whenConnected(node, fn, tries - 1));
}

function render({ model, el }) {
  const data = model.get("_data");
  const steps = data.steps.map((s) => ({ ...s, logit: f32FromBase64(s.logits) }));
  const S = steps.length;
  const label = (id) => data.labels[String(id)] ?? String(id);
  const isTrace = !!data.pieces;

  const root = el_("div", { class: "mgv-samp" });
  root.append(el_("style", { text: CSS }));
  if (data.title) root.append(el_("div", { class: "mgv-title", text: data.title }));
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
      const shown = /^\s*$/.test(piece) ? label(steps[step].chosen) : piece;
      parts.push(el_("span", { class: "mgv-now", title: `token sampled at step ${step + 1}`, text: shown }));
    } else {
      parts.push(el_("span", { class: "mgv-next", text: "?" }));
    }
    context.replaceChildren(...parts);
    const now = context.querySelector(".mgv-now, .mgv-next");
    if (now && context.scrollHeight > context.clientHeight) context.scrollTop = context.scrollHeight;
  }

  function row(rank, id, name, prob, modelProb, kept, scale, exact, extraClass) {
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
    const num = kept ? (exact ? "" : "\u2248") + pct(prob) : "\u2013";
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
    const st = steps[step];
    const f = filterStep(st.logit, st.tail, settings);
    let scale = 1e-12;
    for (let i = 0; i < st.ids.length; i++) scale = Math.max(scale, f.probs[i], f.modelProbs[i]);
    if (st.tail) scale = Math.max(scale, f.other, f.modelOther);
    const rows = st.ids.map((id, i) => row(i, id, label(id), f.probs[i], f.modelProbs[i], i < f.nKeep,
      scale, f.exact, id === st.chosen ? "mgv-chosen" : ""));
    if (st.tail) {
      rows.push(row("", "other", `other (${st.tail.count})`, f.other, f.modelOther, f.otherKept, scale, f.exact, "mgv-other"));
    }
    bars.replaceChildren(...rows);
    bars.dataset.step = String(step);
    bars.dataset.entropy = f.entropy.toPrecision(10);
    bars.dataset.exact = f.exact ? "1" : "0";
    bars.dataset.keptCount = String(f.nKeep);

    const shown = st.ids.length;
    const tailText = st.tail ? ` (+ ${f.otherKept ? pct(f.other) : "none"} from the ${st.tail.count} others)` : "";
    summary.replaceChildren(
      "kept ", el_("b", { text: String(f.nKeep) }), ` of ${shown} shown tokens${tailText} \u00b7 entropy `,
      el_("b", { "data-role": "entropy", text: (f.exact ? "" : "\u2248") + f.entropy.toFixed(3) }), " nats",
      ...(f.exact ? [] : [el_("span", { class: "mgv-approx", text:
        " \u00b7 \u2248: a filter cuts through the tokens not shipped; they are kept as one block" })]));

    if (isTrace) {
      stepText.textContent = `token ${step + 1} of ${S}`;
      prev.disabled = step === 0;
      next.disabled = step === S - 1;
      const inTop = st.chosen_rank !== null && st.chosen_rank < shown;
      const where = inTop ? `rank ${st.chosen_rank + 1}` : `rank ${st.chosen_rank + 1}, among the others`;
      const pNow = inTop ? st.ids.indexOf(st.chosen) : -1;
      const keptNow = inTop ? pNow < f.nKeep : f.otherKept;
      chosenText.replaceChildren("sampled ", el_("b", { class: "mgv-mono", text: label(st.chosen) }),
        ` (${where}${keptNow ? "" : "; removed by the current settings"})`);
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
