// What every minigpt widget module shares: DOM and payload helpers and the theme. _widget.py's
// read_module puts this text in front of each module, so each stays one self-contained ES module
// (for anywidget and for the kernel-free text/html copy alike) with no import to resolve.

// Colours follow the host: the text colour is inherited (JupyterLab, VS Code, Colab, a book page,
// or a dark page's light output panel alike) and greys are mixed from it; the accent is the
// host's brand colour where it has one.
const BASE_CSS = `
.mgv {
  --mgv-accent: var(--jp-brand-color1, var(--pst-color-primary, var(--vscode-textLink-foreground, #2f6fd0)));
  --mgv-muted: color-mix(in srgb, currentColor 62%, transparent);
  --mgv-line: color-mix(in srgb, currentColor 24%, transparent);
  --mgv-mono: ui-monospace, SFMono-Regular, Menlo, Consolas, "Liberation Mono", monospace;
  color: inherit;
  font-family: system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif;
  font-size: 13px; line-height: 1.35; padding: 6px 2px;
}
.mgv .mgv-title { font-weight: 600; margin: 0 0 6px; }
.mgv .mgv-mono { font-family: var(--mgv-mono); }
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

// A widget's root element: the theme plus the widget's own `css`, and its title if it has one.
function widgetRoot(className, css, title) {
  const root = el_("div", { class: `mgv ${className}` }, el_("style", { text: BASE_CSS + css }));
  if (title) root.append(el_("div", { class: "mgv-title", text: title }));
  return root;
}

// The payloads carry arrays as base64 of their little-endian bytes (minigpt.viz._common.b64encode).
function bytesFromBase64(b64) {
  const bin = atob(b64);
  const out = new Uint8Array(bin.length);
  for (let i = 0; i < bin.length; i++) out[i] = bin.charCodeAt(i);
  return out;
}

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
