// Builds the Astria Prompt live preview from the JSON of POST /astria/parse.
// Prompts are pasted from the web: every piece of user text goes in through textContent, never innerHTML.

const STYLE_ID = "astria-preview-style";
const STYLE_TEXT = `
.astria-preview { font: 12px/1.4 ui-monospace, Menlo, Consolas, monospace; color: var(--input-text, #ddd);
  background: var(--comfy-input-bg, #222); border-radius: 4px; padding: 4px 6px; overflow: auto;
  box-sizing: border-box; width: 100%; height: 100%; white-space: normal; }
.astria-preview .astria-row { margin: 1px 0; overflow-wrap: anywhere; }
.astria-preview .astria-label { color: #9ab; margin-right: 4px; }
.astria-preview .astria-ok { color: #7c7; }
.astria-preview .astria-missing, .astria-preview .astria-syntax-error { color: #f55; }
.astria-preview .astria-warn { color: #e9a23b; }
.astria-preview .astria-remote { color: #8ac7ff; }
.astria-preview .astria-muted { color: #888; }
.astria-preview pre { margin: 2px 0; white-space: pre; overflow-x: auto; }
`;

/** Add the preview's stylesheet to the page once (static text, no user input). */
export function ensureStyle(doc = document) {
  if (doc.getElementById(STYLE_ID)) return;
  const style = doc.createElement("style");
  style.id = STYLE_ID;
  style.textContent = STYLE_TEXT;
  doc.head.appendChild(style);
}

/** An element with a class and text set through textContent. */
function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined && text !== null) node.textContent = String(text);
  return node;
}

/** One labelled row: "Label: part part part". */
function row(label, parts, className = "") {
  const line = el("div", `astria-row ${className}`.trim());
  line.appendChild(el("span", "astria-label", label));
  for (const part of parts) line.appendChild(typeof part === "string" ? document.createTextNode(part) : part);
  return line;
}

/** The mark and colour of each level, worst first: what fails the run, what only informs, all good. */
const LEVELS = {
  error: { mark: "✖", className: "astria-missing" },
  warn: { mark: "⚠", className: "astria-warn" },
  ok: { mark: "✔", className: "astria-ok" },
};

/** The first row: the level's mark (in the level's colour) before the summary. */
function statusRow(level, parts, className) {
  const line = row(LEVELS[level].mark, parts, className);
  line.firstChild.classList.add(LEVELS[level].className, "astria-mark");
  return line;
}

/** A value as Astria writes it: true -> flag alone, null -> empty. */
function shown(value) {
  if (value === null || value === undefined) return "";
  if (typeof value === "number") return String(Number(value.toFixed(6)));
  return String(value);
}

/** The line the parser refused, with a caret under the column (both as plain text). */
function errorExcerpt(text, line, column) {
  const lines = String(text ?? "").replace(/\r\n?/g, "\n").split("\n");
  const source = lines[line - 1];
  if (source === undefined || column < 1) return null;
  const start = Math.max(0, column - 60);
  const shownLine = (start > 0 ? "…" : "") + source.slice(start, start + 120);
  const caret = " ".repeat(column - 1 - start + (start > 0 ? 1 : 0)) + "^";
  return el("pre", "astria-syntax-error", `${shownLine}\n${caret}`);
}

/** The rows for each LoRA tag: the file it loads (green) or missing with the closest names (red). */
function loraRows(loras) {
  return loras.map((lora) => {
    const tag = `<lora:${lora.name}:${shown(lora.weight)}>`;
    if (lora.ok) {
      return row("LoRA", [el("span", "astria-ok", `${tag} → ${lora.file} (${lora.method})`)], "astria-lora-found");
    }
    const closest = (lora.candidates || []).length ? ` Closest: ${lora.candidates.join(", ")}` : "";
    const line = row("LoRA", [el("span", "astria-missing", `${tag} MISSING.${closest}`)], "astria-lora-missing");
    line.title = lora.error || "";
    return line;
  });
}

/** The one-line account of the local run's settings. */
function settingsRow(settings) {
  const s = settings;
  const size = s.width || s.height ? `${s.width || "auto"}x${s.height || "auto"}` : "from the node's scale";
  const seed = s.seed === null ? "the node's seed" : `seed ${s.seed}`;
  const fromNode = (s.from_node || []).length
    ? `; unset here, so the upscale node's widgets decide (defaults shown): ${s.from_node.join(", ")}` : "";
  return row("Local run", [`${s.steps} steps (${s.steps_to_run} run) at denoise ${shown(s.denoise)}, cfg ${shown(s.cfg)}, ` +
    `${s.sampler_name}/${s.scheduler}, ${seed}, ${s.num_images} image(s), size ${size}, weighting ${s.weighting}` +
    fromNode]);
}

/** Fill `container` with the preview of one parse answer (replacing what it showed). */
export function renderReport(container, report, text) {
  container.replaceChildren();
  delete container.dataset.worst;
  if (!report) {
    container.dataset.state = "empty";
    return;
  }
  if (!report.ok) {
    container.dataset.state = "error";
    const error = report.error || {};
    const where = error.line ? `Syntax error at line ${error.line}, column ${error.column}: ` : "Error: ";
    const detail = error.problem ? `${error.problem}; ${error.fix}` : error.message;
    container.dataset.worst = "error";
    container.appendChild(statusRow("error", [el("span", "astria-syntax-error", where + detail)], "astria-error"));
    const excerpt = error.line ? errorExcerpt(text, error.line, error.column) : null;
    if (excerpt) container.appendChild(excerpt);
    for (const line of loraRows(report.loras || [])) container.appendChild(line); // the other lines' LoRAs
    return;
  }
  container.dataset.state = "ok";
  const missing = report.loras.filter((lora) => !lora.ok).length;
  const flags = Object.entries(report.flags);
  const params = Object.entries(report.params);
  const status = `${report.loras.length} LoRA(s)${missing ? `, ${missing} missing` : ""}, ${flags.length} flag(s), ` +
    `${params.length} parameter(s)`;
  // The mark says what the worst item below says: a missing LoRA fails the run, a warning only informs.
  const worst = missing ? "error" : report.settings_error || (report.warnings || []).length ? "warn" : "ok";
  container.dataset.worst = worst;
  container.appendChild(statusRow(worst, [el("span", LEVELS[worst].className, status)], "astria-status"));
  for (const line of loraRows(report.loras)) container.appendChild(line);
  if (flags.length) {
    container.appendChild(row("Flags", [flags.map(([k, v]) => (v === true ? `--${k}` : `--${k} ${shown(v)}`)).join(" ")]));
  }
  if (params.length) {
    container.appendChild(row("Params", [params.map(([k, v]) => `${k}=${shown(v)}`).join("  ")]));
  }
  if (report.settings) container.appendChild(settingsRow(report.settings));
  if (report.settings_error) {
    container.appendChild(row("Local run not possible", [el("span", "astria-warn", report.settings_error)]));
  }
  const remote = (report.not_applied || []).filter((note) => note.kind === "remote_only");
  if (remote.length) {
    const items = remote.map((note) => note.item).join("  ");
    container.appendChild(row("Remote only", [el("span", "astria-remote", items)], "astria-remote-only"));
  }
  for (const note of (report.not_applied || []).filter((n) => n.kind !== "remote_only")) {
    container.appendChild(row("Not applied", [el("span", "astria-warn", `${note.item}: ${note.detail}`)]));
  }
  for (const notice of report.notices || []) container.appendChild(row("Notice", [el("span", "astria-muted", notice)]));
  for (const warning of report.warnings || []) {
    container.appendChild(row("Warning", [el("span", "astria-warn", warning)], "astria-warning"));
  }
}

/** Show that a request failed (server down, route missing) without hiding the last good preview's meaning. */
export function renderFailure(container, message) {
  container.replaceChildren(row("Preview unavailable", [el("span", "astria-warn", message)]));
  container.dataset.state = "unavailable";
  delete container.dataset.worst;
}
