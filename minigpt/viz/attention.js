// Attention view for minigpt: an anywidget ES module that also runs in a static page.
//
// model.get("_data") is the payload of minigpt.viz.attention.encode_attention:
//   { tokens: [T labels], n_layer, n_head, T, bits: 8 | 16, weights: base64, title }
// where weights are the lower triangles (layer, head, query row, key col <= row) quantised to
// `bits` bits. model "layer" and "head" are the synced selection.
// The module only uses plain DOM APIs, so it needs no bundler, no CDN and no kernel; el_,
// widgetRoot, bytesFromBase64, adaptScheme and whenConnected come from prelude.js.

const CSS = `
.mgv-attn { max-width: 100%; overflow-x: auto; }
.mgv-attn .mgv-controls { display: flex; flex-wrap: wrap; gap: 6px 16px; align-items: center; margin-bottom: 6px; }
.mgv-attn label { display: inline-flex; gap: 6px; align-items: center; }
.mgv-attn select { font: inherit; color: inherit; background: transparent;
  border: 1px solid var(--mgv-line); border-radius: 4px; padding: 1px 4px; }
.mgv-attn .mgv-status { font-family: var(--mgv-mono);
  min-height: 1.4em; margin: 2px 0 6px; white-space: pre; color: inherit; }
.mgv-attn .mgv-status .mgv-hint { color: var(--mgv-muted); font-family: inherit; }
.mgv-attn .mgv-body { display: flex; flex-wrap: wrap; gap: 18px; align-items: flex-start; }
.mgv-attn svg.mgv-heat { display: block; overflow: visible; }
.mgv-attn svg.mgv-heat text { fill: currentColor; font-family: var(--mgv-mono); }
.mgv-attn svg.mgv-heat text.mgv-axis { fill: var(--mgv-muted); font-family: inherit; }
.mgv-attn svg.mgv-heat text.mgv-on { fill: var(--mgv-accent); font-weight: 700; }
.mgv-attn svg.mgv-heat rect.mgv-cell { fill: var(--mgv-accent); }
.mgv-attn svg.mgv-heat rect.mgv-cell:hover { stroke: currentColor; stroke-width: 1.5; }
.mgv-attn svg.mgv-heat .mgv-frame { fill: none; stroke: var(--mgv-line); }
.mgv-attn svg.mgv-heat .mgv-hatch line { stroke: var(--mgv-line); stroke-width: 1; }
.mgv-attn .mgv-thumbs-box { min-width: 0; }
.mgv-attn .mgv-thumbs-title { color: var(--mgv-muted); margin-bottom: 4px; }
.mgv-attn .mgv-thumbs { display: grid; grid-template-columns: repeat(var(--mgv-cols, 4), auto); gap: 6px; justify-content: start; }
.mgv-attn button.mgv-thumb { font: inherit; font-size: 11px; color: var(--mgv-muted); background: none; cursor: pointer;
  border: 2px solid transparent; border-radius: 5px; padding: 2px; display: flex; flex-direction: column; align-items: center; gap: 2px; }
.mgv-attn button.mgv-thumb:hover { border-color: var(--mgv-line); }
.mgv-attn button.mgv-thumb.mgv-selected { border-color: var(--mgv-accent); color: inherit; font-weight: 600; }
.mgv-attn button.mgv-thumb canvas { image-rendering: pixelated; border: 1px solid var(--mgv-line); display: block; }
.mgv-attn .mgv-scale { display: inline-flex; align-items: center; gap: 4px; color: var(--mgv-muted); font-size: 11px; }
.mgv-attn .mgv-ramp { width: 80px; height: 9px; border: 1px solid var(--mgv-line);
  background: linear-gradient(to right, transparent, var(--mgv-accent)); }
`;

const FALLBACK_ACCENT = "#2f6fd0";

function escapeXml(s) {
  return String(s).replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[c]);
}

// Full (L, H, T, T) weights as one Float32Array, zeros above the diagonal.
export function decodeWeights(data) {
  const { n_layer: L, n_head: H, T, bits } = data;
  const bytes = bytesFromBase64(data.weights);
  const scale = 2 ** bits - 1;
  const view = new DataView(bytes.buffer);
  const out = new Float32Array(L * H * T * T);
  let k = 0;
  for (let lh = 0; lh < L * H; lh++) {
    const base = lh * T * T;
    for (let i = 0; i < T; i++) {
      for (let j = 0; j <= i; j++, k++) {
        const q = bits === 16 ? view.getUint16(2 * k, true) : bytes[k];
        out[base + i * T + j] = q / scale;
      }
    }
  }
  return out;
}

function shortLabel(s, max) {
  return s.length > max ? s.slice(0, max - 1) + "\u2026" : s;
}

function resolveAccent(node) {
  const v = node.isConnected ? getComputedStyle(node).getPropertyValue("--mgv-accent").trim() : "";
  return v || FALLBACK_ACCENT;
}

function render({ model, el }) {
  const data = model.get("_data");
  const { n_layer: L, n_head: H, T, tokens } = data;
  const W = decodeWeights(data);
  const uid = "mgv" + Math.random().toString(36).slice(2, 10);
  const at = (l, h, i, j) => W[((l * H + h) * T + i) * T + j];

  const root = widgetRoot("mgv-attn", CSS, data.title);

  // Controls: layer, head, colour scale.
  const layerSel = el_("select", { "aria-label": "layer", "data-role": "layer" });
  for (let l = 0; l < L; l++) layerSel.append(el_("option", { value: String(l), text: String(l) }));
  const headSel = el_("select", { "aria-label": "head", "data-role": "head" });
  for (let h = 0; h < H; h++) headSel.append(el_("option", { value: String(h), text: String(h) }));
  const sqrtBox = el_("input", { type: "checkbox", "data-role": "sqrt" });
  const controls = el_("div", { class: "mgv-controls" },
    el_("label", {}, "Layer", layerSel),
    el_("label", {}, "Head", headSel),
    el_("label", { title: "colour = square root of the weight: makes small weights visible" }, sqrtBox, "\u221a scale"),
    el_("span", { class: "mgv-scale" }, "0", el_("span", { class: "mgv-ramp" }), "1"));
  root.append(controls);
  const status = el_("div", { class: "mgv-status", "data-role": "status" });
  const hint = () => {
    status.replaceChildren(el_("span", { class: "mgv-hint",
      text: "hover a cell: query token \u2192 key token: weight (rows read from columns)" }));
  };
  hint();
  root.append(status);

  // Main heatmap, built as one SVG string (parsed in HTML, so no namespace URI is needed).
  const maxLen = Math.max(1, ...tokens.map((t) => t.length));
  const cell = Math.max(4, Math.min(22, Math.floor(520 / T)));
  const showLabels = cell >= 9;
  const labelChars = Math.min(maxLen, 12);
  const fs = Math.min(12, Math.max(9, cell - 3));
  const charW = fs * 0.62;
  const left = (showLabels ? Math.ceil(labelChars * charW) + 10 : 6) + 16;
  const top = (showLabels ? Math.ceil(labelChars * charW) + 10 : 6) + 16;
  const size = cell * T;
  const parts = [];
  parts.push(`<svg class="mgv-heat" width="${left + size + 4}" height="${top + size + 4}" role="img" aria-label="attention heatmap">`);
  parts.push(`<defs><pattern id="${uid}-hatch" class="mgv-hatch" width="6" height="6" patternUnits="userSpaceOnUse" patternTransform="rotate(45)"><line x1="0" y1="0" x2="0" y2="6"/></pattern></defs>`);
  parts.push(`<text class="mgv-axis" x="${left + size / 2}" y="11" text-anchor="middle" font-size="11">key (attended to)</text>`);
  parts.push(`<text class="mgv-axis" transform="translate(11 ${top + size / 2}) rotate(-90)" text-anchor="middle" font-size="11">query (attending)</text>`);
  // The causal upper triangle: a hatched staircase, visibly "not allowed", not "zero".
  let stair = `M${left + cell} ${top}`;
  for (let i = 0; i < T - 1; i++) stair += ` V${top + (i + 1) * cell} H${left + (i + 2) * cell}`;
  stair += ` V${top} Z`;
  if (T > 1) parts.push(`<path d="${stair}" fill="url(#${uid}-hatch)" data-role="masked"><title>masked: a token never attends to later tokens</title></path>`);
  for (let i = 0; i < T; i++) {
    for (let j = 0; j <= i; j++) {
      parts.push(`<rect class="mgv-cell" data-q="${i}" data-k="${j}" x="${left + j * cell}" y="${top + i * cell}" width="${cell}" height="${cell}"/>`);
    }
  }
  parts.push(`<rect class="mgv-frame" x="${left}" y="${top}" width="${size}" height="${size}"/>`);
  if (showLabels) {
    for (let i = 0; i < T; i++) {
      const lab = escapeXml(shortLabel(tokens[i], 12));
      parts.push(`<text data-row="${i}" x="${left - 4}" y="${top + i * cell + cell / 2}" dy="0.35em" text-anchor="end" font-size="${fs}">${lab}</text>`);
      parts.push(`<text data-col="${i}" transform="translate(${left + i * cell + cell / 2} ${top - 4}) rotate(-90)" dy="0.35em" font-size="${fs}">${lab}</text>`);
    }
  }
  parts.push(`</svg>`);
  const heatBox = el_("div", { class: "mgv-heat-box" });
  heatBox.innerHTML = parts.join("");
  const svg = heatBox.firstElementChild;
  const cells = Array.from(svg.querySelectorAll("rect.mgv-cell"));

  // Thumbnails of every head of the layer: canvases, one pixel per cell, scaled up.
  const thumbPx = Math.max(48, Math.min(96, Math.round(320 / Math.ceil(Math.sqrt(H)))));
  const thumbs = el_("div", { class: "mgv-thumbs", "data-role": "thumbs" });
  thumbs.style.setProperty("--mgv-cols", String(Math.min(H, 4)));
  const thumbButtons = [];
  for (let h = 0; h < H; h++) {
    const canvas = el_("canvas", { width: String(T), height: String(T) });
    canvas.style.width = canvas.style.height = `${thumbPx}px`;
    const b = el_("button", { type: "button", class: "mgv-thumb", "data-head": String(h), title: `show head ${h}` },
      canvas, el_("span", { text: `head ${h}` }));
    b.addEventListener("click", () => { model.set("head", h); model.save_changes(); });
    thumbButtons.push(b);
    thumbs.append(b);
  }
  const thumbTitle = el_("div", { class: "mgv-thumbs-title" });
  root.append(el_("div", { class: "mgv-body" }, heatBox,
    el_("div", { class: "mgv-thumbs-box" }, thumbTitle, thumbs)));
  el.replaceChildren(root);

  const shade = (w) => (sqrtBox.checked ? Math.sqrt(w) : w);

  function drawThumbs(layer) {
    const accent = resolveAccent(root);
    thumbTitle.textContent = `all heads of layer ${layer} (click one)`;
    for (let h = 0; h < H; h++) {
      const ctx = thumbButtons[h].firstElementChild.getContext("2d");
      ctx.clearRect(0, 0, T, T);
      ctx.fillStyle = accent;
      for (let i = 0; i < T; i++) {
        for (let j = 0; j <= i; j++) {
          ctx.globalAlpha = Math.min(1, shade(at(layer, h, i, j)));
          ctx.fillRect(j, i, 1, 1);
        }
      }
      ctx.globalAlpha = 1;
    }
  }

  function update() {
    const layer = Math.min(L - 1, Math.max(0, model.get("layer") | 0));
    const head = Math.min(H - 1, Math.max(0, model.get("head") | 0));
    layerSel.value = String(layer);
    headSel.value = String(head);
    let sum = 0;
    for (const r of cells) {
      const w = at(layer, head, +r.dataset.q, +r.dataset.k);
      r.setAttribute("fill-opacity", shade(w).toFixed(4));
      r.dataset.w = w.toFixed(5);
      sum += w * (1 + +r.dataset.q * T + +r.dataset.k);
    }
    svg.dataset.layer = String(layer);
    svg.dataset.head = String(head);
    svg.dataset.checksum = sum.toFixed(5);
    thumbButtons.forEach((b, h) => b.classList.toggle("mgv-selected", h === head));
    drawThumbs(layer);
  }

  // Hover: "query → key: weight", and the two labels highlighted.
  let lit = [];
  svg.addEventListener("mouseover", (e) => {
    const r = e.target.closest && e.target.closest("rect.mgv-cell");
    if (!r) return;
    const i = +r.dataset.q, j = +r.dataset.k;
    status.textContent = `${tokens[i]} (${i}) \u2192 ${tokens[j]} (${j}): ${(+r.dataset.w).toFixed(3)}`;
    lit.forEach((t) => t.classList.remove("mgv-on"));
    lit = [svg.querySelector(`text[data-row="${i}"]`), svg.querySelector(`text[data-col="${j}"]`)].filter(Boolean);
    lit.forEach((t) => t.classList.add("mgv-on"));
  });
  svg.addEventListener("mouseleave", () => { lit.forEach((t) => t.classList.remove("mgv-on")); lit = []; hint(); });

  layerSel.addEventListener("change", () => { model.set("layer", +layerSel.value); model.save_changes(); });
  headSel.addEventListener("change", () => { model.set("head", +headSel.value); model.save_changes(); });
  sqrtBox.addEventListener("change", update);
  model.on("change:layer", update);
  model.on("change:head", update);
  update();

  // The canvas needs the theme's accent colour, known only once the view is in the document.
  whenConnected(root, () => { adaptScheme(root); drawThumbs(+layerSel.value); });

  return () => {
    model.off("change:layer", update);
    model.off("change:head", update);
  };
}

export default { render };
